package codearea

import (
	"context"
	"encoding/binary"
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
// text or the data [dlo, dhi) on every thread's live kernel stack: from the
// saved stack pointer up for a thread that is not running, from the vCPU's
// RSP up (or the whole stack, when the RSP is not on it) for one that is.
// A pointer into the data on a live stack (a format string being printed)
// is use too: the data is zeroed on release.
func (a *Area) inUse(sg hypervisor.StoppedGuest, name string, lo, hi, dlo, dhi uint64) error {
	k := a.k
	cpus, err := a.registers(sg)
	if err != nil {
		return err
	}
	as := introspect.NewAddressSpace(k.Mem, k.CR3, k.LA57) // stacks are vmalloc'd and reused: no stale cache
	var where []string
	for _, c := range cpus {
		if c.RIP >= lo && c.RIP < hi {
			where = append(where, fmt.Sprintf("vCPU %d executes it (RIP %#x)", c.Index, c.RIP))
		}
	}
	list := a.threads
	if a.threadsFn != nil {
		list = a.threadsFn
	}
	threads, err := list(as)
	if err != nil {
		return fmt.Errorf("codearea: listing threads to check %s is unused: %w", name, err)
	}
	scan := func(who string, from, to uint64) error {
		buf := make([]byte, pageSize)
		for p := from; p < to; {
			n := min(to-p, pageSize-p%pageSize)
			if err := as.ReadVirt(p, buf[:n]); err != nil {
				return fmt.Errorf("%s: stack at %#x: %w", who, p, err)
			}
			for i := uint64(0); i+8 <= n; i += 8 {
				if v := binary.LittleEndian.Uint64(buf[i:]); v >= lo && v < hi || v >= dlo && v < dhi {
					where = append(where, fmt.Sprintf("%s has %#x on its stack at %#x", who, v, p+i))
					return nil
				}
			}
			p += n
		}
		return nil
	}
	onStack := map[int]bool{}
	for _, th := range threads {
		who := fmt.Sprintf("PID %d (%s)", th.pid, th.comm)
		top := th.stack + threadSize
		from := th.sp
		if th.onCPU {
			from = th.stack
			for i, c := range cpus {
				if c.RSP >= th.stack && c.RSP < top {
					from, onStack[i] = c.RSP, true
				}
			}
		}
		if from < th.stack || from > top {
			from = th.stack // a saved sp off its stack: be conservative
		}
		if err := scan(who, from&^7, top); err != nil {
			return fmt.Errorf("codearea: %w", err)
		}
	}
	// A vCPU on an IRQ or exception stack: its frames up to the end of
	// that stack (at most a stack's size, up to the first unmapped page).
	for i, c := range cpus {
		if onStack[i] || c.CPL != 0 || c.RSP < 1<<63 {
			continue
		}
		end := c.RSP + threadSize
		for p := (c.RSP + pageSize) &^ (pageSize - 1); p < end; p += pageSize {
			if _, err := as.Translate(p); err != nil {
				end = p
			}
		}
		if err := scan(fmt.Sprintf("vCPU %d", c.Index), c.RSP&^7, end); err != nil {
			return fmt.Errorf("codearea: %w", err)
		}
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
}

// threads lists every thread (the task list holds group leaders; each
// leader's signal->thread_head lists its threads).
func (a *Area) threads(as *introspect.AddressSpace) ([]thread, error) {
	k := a.k
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
		return thread{
			pid:   int(int32(u64(t + oPID))),
			comm:  comm,
			stack: u64(t + oStack),
			sp:    u64(t + oSP),
			onCPU: uint32(u64(t+oOnCPU)) != 0,
		}
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
	return out, ferr
}
