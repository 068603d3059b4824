package codearea

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
)

// Removing the jump to a replacement stops new calls, but a task may still
// be inside it: executing it on a vCPU, interrupted in it, or in a function
// it called (seq_printf, or anything that sleeps) that will return into
// it. Clearing the code then makes that task fault (seen on the test
// guests: the oops came at the instruction after the call to seq_printf).
// So before releasing, every vCPU's RIP and every task's live kernel stack
// are searched for an address in the object's text.

// InUseError says the object's code may still be running.
type InUseError struct {
	Name  string
	Where []string
}

func (e *InUseError) Error() string {
	return fmt.Sprintf("codearea: %s is still in use: %s", e.Name, strings.Join(e.Where, "; "))
}

// threadSize is THREAD_SIZE on x86-64 without KASAN (both Debian kernels).
const threadSize = 16 << 10

// registers gets the vCPU registers for the stop sg: the stopped guest
// reads them when its writer can (hypervisor.Capabilities.Registers);
// otherwise nothing may be released.
func (a *Area) registers(sg hypervisor.StoppedGuest) ([]hypervisor.CPUState, error) {
	cpus, err := sg.Registers(context.Background())
	if errors.Is(err, hypervisor.ErrNoRegisters) {
		return nil, fmt.Errorf("codearea: cannot read the vCPUs' registers during the stop (%w): refusing to release code that may be running", err)
	}
	if err != nil {
		return nil, fmt.Errorf("codearea: reading the vCPUs' registers during the stop: %w", err)
	}
	return cpus, nil
}

// inUse searches for the text [lo, hi) in the vCPUs' RIPs, and for the
// text or the data [dlo, dhi) on every live kernel stack (FindActivity
// says which). A pointer into the data on a live stack (a format string
// being printed) is use too: the data is zeroed on release.
func (a *Area) inUse(sg hypervisor.StoppedGuest, name string, lo, hi, dlo, dhi uint64) error {
	cpus, err := a.registers(sg)
	if err != nil {
		return err
	}
	list := threadLister(a.threads)
	if a.threadsFn != nil {
		list = a.threadsFn
	}
	text, data := Span{Name: name, Lo: lo, Hi: hi}, Span{Name: name + " (data)", Lo: dlo, Hi: dhi}
	act, err := findActivity(a.k, cpus, list, []Span{text}, []Span{text, data})
	if err != nil {
		return fmt.Errorf("codearea: checking %s is unused: %w", name, err)
	}
	var where []string
	for _, u := range act.Uses {
		where = append(where, u.String())
	}
	if len(where) > 0 {
		return &InUseError{Name: name, Where: where}
	}
	return nil
}

type thread struct {
	pid       int
	comm      string
	stack, sp uint64
	onCPU     bool
	exiting   bool // PF_EXITING set or exit_state non-zero
}

// pfExiting is PF_EXITING of task_struct.flags (the same in every kernel
// since 2.6).
const pfExiting = 0x4

// dropStackless leaves out the threads that hold no kernel stack: a task
// caught while exiting whose stack was freed (task_struct.stack is NULL
// after release_task_stack), or an exiting task whose stack is no longer
// mapped (freed, the pointer not cleared yet). Nothing runs on such a stack,
// so such a task holds nothing in the code area, and it must not block a
// release (the scan would fail at address 0 or at the unmapped page). A
// task that is not exiting keeps its stack in the list, mapped or not: an
// unmapped stack of a live task is an error for the scan to report.
func dropStackless(ths []thread, mapped func(va uint64) bool) []thread {
	out := ths[:0]
	for _, th := range ths {
		if th.stack == 0 || th.exiting && !mapped((th.stack+threadSize-1)&^(pageSize-1)) {
			continue
		}
		out = append(out, th)
	}
	return out
}

// threads lists every thread (the task list holds group leaders; each
// leader's signal->thread_head lists its threads).
func (a *Area) threads(as *introspect.AddressSpace) ([]thread, error) {
	return threadsOf(a.k)(as)
}

// threadsOf lists the threads of k (see Area.threads).
func threadsOf(k *introspect.Kernel) threadLister {
	return func(as *introspect.AddressSpace) ([]thread, error) { return listThreads(k, as) }
}

func listThreads(k *introspect.Kernel, as *introspect.AddressSpace) ([]thread, error) {
	leaders, err := k.Tasks()
	if err != nil {
		return nil, err
	}
	var ferr error
	off := func(path string) uint64 {
		f, err := k.Field(path)
		if err != nil && ferr == nil {
			ferr = err
		}
		return f.Offset
	}
	oStack, oOnCPU, oSP := off("task_struct.stack"), off("task_struct.on_cpu"), off("task_struct.thread.sp")
	oSignal, oHead, oNode := off("task_struct.signal"), off("signal_struct.thread_head"), off("task_struct.thread_node")
	oPID, oComm := off("task_struct.pid"), off("task_struct.comm")
	if ferr != nil {
		return nil, ferr
	}
	// Optional: without them no task counts as exiting.
	oFlags, errFlags := k.Field("task_struct.flags")
	oExit, errExit := k.Field("task_struct.exit_state")
	u64 := func(va uint64) uint64 {
		v, err := as.ReadUint64(va)
		if err != nil && ferr == nil {
			ferr = err
		}
		return v
	}
	read := func(t uint64) thread {
		var b [16]byte
		if err := as.ReadVirt(t+oComm, b[:]); err != nil && ferr == nil {
			ferr = err
		}
		comm, _, _ := strings.Cut(string(b[:]), "\x00")
		th := thread{
			pid:   int(int32(u64(t + oPID))),
			comm:  comm,
			stack: u64(t + oStack),
			sp:    u64(t + oSP),
			onCPU: uint32(u64(t+oOnCPU)) != 0,
		}
		if errFlags == nil && errExit == nil {
			flags, err1 := as.ReadUint64(t + oFlags.Offset)
			exit, err2 := as.ReadUint64(t + oExit.Offset)
			th.exiting = err1 == nil && err2 == nil && (uint32(flags)&pfExiting != 0 || uint32(exit) != 0)
		}
		return th
	}
	var out []thread
	seen := map[uint64]bool{}
	for _, l := range leaders {
		if !seen[l.Addr] {
			seen[l.Addr] = true
			out = append(out, read(l.Addr))
		}
		sig := u64(l.Addr + oSignal)
		if sig == 0 || ferr != nil {
			continue
		}
		head := sig + oHead
		node := u64(head)
		for n := 0; node != head && node != 0 && ferr == nil; n++ {
			if n > 1<<16 {
				return nil, fmt.Errorf("thread list of PID %d does not end", l.PID)
			}
			t := node - oNode
			if !seen[t] {
				seen[t] = true
				out = append(out, read(t))
			}
			node = u64(node)
		}
	}
	if ferr != nil {
		return nil, ferr
	}
	return dropStackless(out, func(va uint64) bool { _, err := as.Translate(va); return err == nil }), nil
}
