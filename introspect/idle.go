package introspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// maxCPUs bounds the per-CPU walk (NR_CPUS is at most 8192 on x86-64).
const maxCPUs = 8192

// IdleTasks returns the idle task (PID 0, "swapper/N") of every CPU that
// has one: CPU 0's is init_task, the others' are the per-CPU runqueues'
// idle pointers (runqueues + __per_cpu_offset[cpu], rq.idle from BTF).
// Only init_task is on the task list, so a ps that walks the list alone
// shows CPU 0's idle task only.
func (k *Kernel) IdleTasks() ([]Task, error) {
	l, err := k.taskLayout()
	if err != nil {
		return nil, err
	}
	initTask, err := k.Symbols.Addr("init_task")
	if err != nil {
		return nil, err
	}
	as := k.walkAS("idle tasks")
	buf := make([]byte, l.span)
	taskAt := func(addr uint64) (Task, error) {
		if err := as.ReadVirt(addr, buf); err != nil {
			return Task{}, fmt.Errorf("reading task_struct at %#x: %w", addr, err)
		}
		u32 := func(off uint64) uint32 { return binary.LittleEndian.Uint32(buf[off:]) }
		comm := buf[l.comm : l.comm+l.commSize]
		if i := bytes.IndexByte(comm, 0); i >= 0 {
			comm = comm[:i]
		}
		state := uint64(u32(l.state))
		if l.stateSize == 8 {
			state = binary.LittleEndian.Uint64(buf[l.state:])
		}
		return Task{PID: int(int32(u32(l.pid))), TGID: int(int32(u32(l.tgid))), Comm: string(comm),
			State: uint(state | uint64(u32(l.exit))), StackPointer: binary.LittleEndian.Uint64(buf[l.sp:]),
			Addr: addr, MM: binary.LittleEndian.Uint64(buf[l.mm:])}, nil
	}
	first, err := taskAt(initTask)
	if err != nil {
		return nil, err
	}
	out := []Task{first}
	rq, err1 := k.Symbols.Addr("runqueues")
	offsets, err2 := k.Symbols.Addr("__per_cpu_offset")
	idle, err3 := k.Field("rq.idle")
	n, err4 := k.nrCPUIDs(as)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
		return out, nil // a kernel without them (UP build): CPU 0 only
	}
	for cpu := 1; cpu < n; cpu++ {
		off, err := as.ReadUint64(offsets + uint64(cpu)*8)
		if err != nil {
			return nil, fmt.Errorf("__per_cpu_offset[%d]: %w", cpu, err)
		}
		p, err := as.ReadUint64(rq + off + idle.Offset)
		if err != nil || p == 0 {
			continue // a possible CPU that was never brought up
		}
		t, err := taskAt(p)
		if err != nil {
			return nil, fmt.Errorf("idle task of CPU %d: %w", cpu, err)
		}
		out = append(out, t)
	}
	return out, nil
}

// nrCPUIDs is the kernel's nr_cpu_ids (the possible CPUs), bounded.
func (k *Kernel) nrCPUIDs(as *AddressSpace) (int, error) {
	a, err := k.Symbols.Addr("nr_cpu_ids")
	if err != nil {
		return 0, err
	}
	var b [4]byte
	if err := as.ReadVirt(a, b[:]); err != nil {
		return 0, err
	}
	n := binary.LittleEndian.Uint32(b[:])
	if n == 0 || n > maxCPUs {
		return 0, fmt.Errorf("nr_cpu_ids %d out of range", n)
	}
	return int(n), nil
}
