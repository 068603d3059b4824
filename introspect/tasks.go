package introspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Task is one process (thread-group leader) of the guest, as the kernel's
// task list holds it.
type Task struct {
	PID, PPID, TGID int
	Comm            string
	State           uint   // __state | exit_state, the raw bits
	StackPointer    uint64 // thread.sp: the saved kernel stack pointer of a task not on a CPU
	Addr            uint64 // address of its task_struct
	MM              uint64 // its mm_struct, 0 for kernel threads
}

// StateLetter is the one-letter state ps shows, computed the way the
// kernel's task_state_index does it.
func (t Task) StateLetter() string {
	const (
		taskReportMask = 0x7f  // TASK_REPORT: the bits /proc reports
		taskIdle       = 0x402 // TASK_UNINTERRUPTIBLE | TASK_NOLOAD
		taskRTLockWait = 0x1000
	)
	// State holds __state | exit_state; __state alone is in the low bits
	// unless the task is exiting.
	switch t.State {
	case taskIdle:
		return "I"
	case taskRTLockWait:
		return "D"
	}
	s := t.State & taskReportMask
	const letters = "RSDTtXZP"
	i := 0
	for s != 0 {
		i++
		s >>= 1
	}
	if i >= len(letters) {
		return "?"
	}
	return letters[i : i+1]
}

// maxListLength bounds list walks over guest memory: a corrupt or changing
// list must not loop forever.
const maxListLength = 1 << 20

// taskLayout is the part of struct task_struct Tasks reads.
type taskLayout struct {
	size                                                    uint64
	tasks, pid, tgid, comm, realParent, state, exit, sp, mm uint64
	stateSize                                               uint64
}

func (k *Kernel) taskLayout() (taskLayout, error) {
	var l taskLayout
	var err error
	get := func(path string) uint64 {
		if err != nil {
			return 0
		}
		var f Field
		f, err = k.Field(path)
		return f.Offset
	}
	l.tasks = get("task_struct.tasks")
	l.pid = get("task_struct.pid")
	l.tgid = get("task_struct.tgid")
	l.comm = get("task_struct.comm")
	l.realParent = get("task_struct.real_parent")
	l.exit = get("task_struct.exit_state")
	l.sp = get("task_struct.thread.sp")
	l.mm = get("task_struct.mm")
	if err != nil {
		return l, fmt.Errorf("task_struct layout: %w", err)
	}
	// 5.14 renamed state to __state (and made it unsigned int).
	f, err := k.Field("task_struct.__state")
	if err != nil {
		if f, err = k.Field("task_struct.state"); err != nil {
			return l, fmt.Errorf("task_struct layout: no __state or state member: %w", err)
		}
	}
	l.state, l.stateSize = f.Offset, f.Size
	if l.size, err = SizeOf(k.BTF, "task_struct"); err != nil {
		return l, err
	}
	return l, nil
}

// Tasks walks the task list from init_task (the idle task, PID 0, listed
// first). Threads other than group leaders are not on this list, exactly as
// /proc lists only processes.
func (k *Kernel) Tasks() ([]Task, error) {
	l, err := k.taskLayout()
	if err != nil {
		return nil, err
	}
	initTask, err := k.Symbols.Addr("init_task")
	if err != nil {
		return nil, err
	}
	buf := make([]byte, l.size)
	read := func(addr uint64) (Task, uint64, error) {
		if err := k.AS.ReadVirt(addr, buf); err != nil {
			return Task{}, 0, fmt.Errorf("reading task_struct at %#x: %w", addr, err)
		}
		u32 := func(off uint64) uint32 { return binary.LittleEndian.Uint32(buf[off:]) }
		u64 := func(off uint64) uint64 { return binary.LittleEndian.Uint64(buf[off:]) }
		comm := buf[l.comm : l.comm+16]
		if i := bytes.IndexByte(comm, 0); i >= 0 {
			comm = comm[:i]
		}
		state := uint64(u32(l.state))
		if l.stateSize == 8 {
			state = u64(l.state)
		}
		t := Task{
			PID:          int(int32(u32(l.pid))),
			TGID:         int(int32(u32(l.tgid))),
			Comm:         string(comm),
			State:        uint(state | uint64(u32(l.exit))),
			StackPointer: u64(l.sp),
			Addr:         addr,
			MM:           u64(l.mm),
		}
		return t, u64(l.realParent), nil
	}

	var out []Task
	parents := map[int]uint64{} // index in out -> real_parent
	seen := map[uint64]bool{}
	addr := initTask
	for {
		if seen[addr] {
			return nil, fmt.Errorf("task list loops at %#x", addr)
		}
		seen[addr] = true
		t, parent, err := read(addr)
		if err != nil {
			return nil, err
		}
		parents[len(out)] = parent
		out = append(out, t)
		if len(out) > maxListLength {
			return nil, fmt.Errorf("task list longer than %d entries", maxListLength)
		}
		next, err := k.AS.ReadUint64(addr + l.tasks)
		if err != nil {
			return nil, fmt.Errorf("task list after %#x: %w", addr, err)
		}
		addr = next - l.tasks
		if addr == initTask {
			break
		}
	}
	// PPID is the real parent's TGID; the parent of PID 1 and 2 is
	// init_task, whose TGID is 0, as /proc shows.
	tgidOf := map[uint64]int{}
	for _, t := range out {
		tgidOf[t.Addr] = t.TGID
	}
	var b [4]byte
	for i := range out {
		p := parents[i]
		if tgid, ok := tgidOf[p]; ok {
			out[i].PPID = tgid
			continue
		}
		// A parent that is not a group leader (a thread): read its tgid.
		if err := k.AS.ReadVirt(p+l.tgid, b[:]); err != nil {
			return nil, fmt.Errorf("reading parent of PID %d at %#x: %w", out[i].PID, p, err)
		}
		out[i].PPID = int(int32(binary.LittleEndian.Uint32(b[:])))
	}
	out[0].PPID = 0
	return out, nil
}

// ProcessAddressSpace walks a user process's own page tables (mm->pgd),
// reaching its user mappings as well as the kernel's.
func (k *Kernel) ProcessAddressSpace(t Task) (*AddressSpace, error) {
	if t.MM == 0 {
		return nil, fmt.Errorf("task %d (%s) is a kernel thread: it has no mm", t.PID, t.Comm)
	}
	off, err := k.Offset("mm_struct.pgd")
	if err != nil {
		return nil, err
	}
	pgd, err := k.AS.ReadUint64(t.MM + off)
	if err != nil {
		return nil, fmt.Errorf("reading mm->pgd of PID %d: %w", t.PID, err)
	}
	pa, err := k.DirectMapToPhys(pgd)
	if err != nil {
		return nil, fmt.Errorf("pgd of PID %d: %w", t.PID, err)
	}
	return NewAddressSpace(k.Mem, pa, k.LA57), nil
}
