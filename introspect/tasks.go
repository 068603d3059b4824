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
// list must not loop forever. PID_MAX_LIMIT is 4M; no guest runs a million
// processes or modules.
const maxListLength = 1 << 20

// maxStructSpan bounds how much of one guest struct is read: the span of
// the fields used. task_struct is about 10 KiB, struct module 1 KiB; a
// guest's BTF claiming more is not believed.
const maxStructSpan = 64 << 10

// taskLayout is the part of struct task_struct Tasks reads.
type taskLayout struct {
	span                                                    uint64 // bytes read per task: the end of the last field
	tasks, pid, tgid, comm, realParent, state, exit, sp, mm uint64
	stateSize, commSize                                     uint64
}

// fieldSpan tracks the end of the fields of a struct layout, each checked
// for the size the walk reads from it.
type fieldSpan struct {
	end uint64
	err error
}

// need resolves path and checks that the member is at least min bytes (and,
// if max > 0, at most max).
func (s *fieldSpan) need(k *Kernel, path string, min, max uint64) Field {
	if s.err != nil {
		return Field{}
	}
	f, err := k.Field(path)
	if err == nil && (f.Size < min || max > 0 && f.Size > max) {
		err = fmt.Errorf("BTF says %s is %d bytes, expected %d..%d", path, f.Size, min, max)
	}
	if err != nil {
		s.err = err
		return Field{}
	}
	s.end = maxU(s.end, f.Offset+min)
	return f
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

func (k *Kernel) taskLayout() (taskLayout, error) {
	var l taskLayout
	var s fieldSpan
	l.tasks = s.need(k, "task_struct.tasks", 8, 0).Offset
	l.pid = s.need(k, "task_struct.pid", 4, 4).Offset
	l.tgid = s.need(k, "task_struct.tgid", 4, 4).Offset
	comm := s.need(k, "task_struct.comm", 1, 0)
	l.realParent = s.need(k, "task_struct.real_parent", 8, 8).Offset
	l.exit = s.need(k, "task_struct.exit_state", 4, 4).Offset
	l.sp = s.need(k, "task_struct.thread.sp", 8, 8).Offset
	l.mm = s.need(k, "task_struct.mm", 8, 8).Offset
	if s.err != nil {
		return l, fmt.Errorf("task_struct layout: %w", s.err)
	}
	// TASK_COMM_LEN is 16 (64 since 6.13 allows longer); read at most 64.
	l.comm, l.commSize = comm.Offset, min(comm.Size, 64)
	s.end = maxU(s.end, l.comm+l.commSize)
	// 5.14 renamed state to __state (and made it unsigned int).
	st := "task_struct.__state"
	if _, err := k.Field(st); err != nil {
		st = "task_struct.state"
	}
	f := s.need(k, st, 4, 8)
	if s.err != nil {
		return l, fmt.Errorf("task_struct layout: no usable __state or state member: %w", s.err)
	}
	l.state, l.stateSize = f.Offset, f.Size
	s.end = maxU(s.end, l.state+l.stateSize)
	if s.end > maxStructSpan {
		return l, fmt.Errorf("task_struct layout: the fields read span %d bytes, more than the %d any kernel's task_struct has", s.end, maxStructSpan)
	}
	l.span = s.end
	return l, nil
}

// Tasks walks the task list from init_task (the idle task, PID 0, listed
// first). Threads other than group leaders are not on this list, exactly as
// /proc lists only processes. The walk runs under the kernel's WalkBudget.
func (k *Kernel) Tasks() ([]Task, error) {
	l, err := k.taskLayout()
	if err != nil {
		return nil, err
	}
	initTask, err := k.Symbols.Addr("init_task")
	if err != nil {
		return nil, err
	}
	as := k.walkAS("task walk")
	buf := make([]byte, l.span)
	read := func(addr uint64) (Task, uint64, error) {
		if err := as.ReadVirt(addr, buf); err != nil {
			return Task{}, 0, fmt.Errorf("reading task_struct at %#x: %w", addr, err)
		}
		u32 := func(off uint64) uint32 { return binary.LittleEndian.Uint32(buf[off:]) }
		u64 := func(off uint64) uint64 { return binary.LittleEndian.Uint64(buf[off:]) }
		comm := buf[l.comm : l.comm+l.commSize]
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
	var parents []uint64 // index in out -> real_parent
	seen := map[uint64]bool{}
	addr := initTask
	for {
		if seen[addr] {
			return nil, fmt.Errorf("task list loops at %#x", addr)
		}
		if len(out) >= maxListLength {
			return nil, fmt.Errorf("task list longer than %d entries", maxListLength)
		}
		seen[addr] = true
		t, parent, err := read(addr)
		if err != nil {
			return nil, err
		}
		parents = append(parents, parent)
		out = append(out, t)
		next, err := as.ReadUint64(addr + l.tasks)
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
		if err := as.ReadVirt(p+l.tgid, b[:]); err != nil {
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
		return nil, fmt.Errorf("task %d (%q) is a kernel thread: it has no mm", t.PID, t.Comm)
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
