package codearea

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
)

// The activity scan is shared by the release of replaced code (inUse) and
// the apply's activeness check (package patcher, consistency: stack): with
// the guest stopped, it looks for address ranges in
//
//   - every vCPU's RIP;
//   - every thread's live kernel stack: from the saved stack pointer up to
//     the top for a thread that is not running, from the vCPU's RSP up (or
//     the whole stack, when no vCPU's RSP is on it) for one that is;
//   - the IRQ or exception stack a vCPU in kernel mode is on (its RSP is on
//     no thread's stack): from the RSP up, at most a stack's size, up to
//     the first unmapped page.
//
// Not covered: an IRQ stack whose frames were interrupted by an exception
// taken on another stack (the vCPU's RSP is on the exception stack, so the
// IRQ stack below it is not searched), and values a task keeps elsewhere
// than on its stack. A word is a plain 8-byte-aligned value: a stale value
// in the live part of a stack (a spilled pointer, a dead local) counts too,
// which errs on the side of "in use".

// Span is one address range the scan looks for: [Lo, Hi).
type Span struct {
	Name   string
	Lo, Hi uint64
}

func (s Span) has(v uint64) bool { return v >= s.Lo && v < s.Hi }

// Use is one place a span was found.
type Use struct {
	Span string // the Span's Name
	// VCPU is the vCPU whose RIP (At == 0) or IRQ/exception stack holds the
	// value; -1 for a thread's stack.
	VCPU int
	// PID and Comm name the thread whose kernel stack holds the value
	// (PID is the thread id, as ps -L shows it).
	PID   int
	Comm  string
	Value uint64 // the RIP, or the stack word
	At    uint64 // where on the stack the word is; 0 for a RIP
}

// Thread is true when the use is on a thread's stack.
func (u Use) Thread() bool { return u.VCPU < 0 }

func (u Use) String() string {
	switch {
	case u.Thread():
		return fmt.Sprintf("PID %d (%s) has %#x on its stack at %#x", u.PID, u.Comm, u.Value, u.At)
	case u.At == 0:
		return fmt.Sprintf("vCPU %d executes it (RIP %#x)", u.VCPU, u.Value)
	}
	return fmt.Sprintf("vCPU %d has %#x on its IRQ/exception stack at %#x", u.VCPU, u.Value, u.At)
}

// Activity is the result of a scan.
type Activity struct {
	Uses []Use
	// What was searched: threads, vCPUs on an IRQ/exception stack, stack
	// bytes read.
	Threads, VCPUStacks int
	StackBytes          uint64
}

// Tasks lists the uses on threads' stacks grouped by thread: "PID 42
// (cat): pipe_read, pipe_write", sorted by PID.
func (a *Activity) Tasks() []string {
	type key struct {
		pid  int
		comm string
	}
	spans := map[key][]string{}
	for _, u := range a.Uses {
		if u.Thread() {
			k := key{u.PID, u.Comm}
			if !contains(spans[k], u.Span) {
				spans[k] = append(spans[k], u.Span)
			}
		}
	}
	keys := make([]key, 0, len(spans))
	for k := range spans {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].pid < keys[j].pid })
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = fmt.Sprintf("PID %d (%s): %s", k.pid, k.comm, strings.Join(spans[k], ", "))
	}
	return out
}

// Spans lists the names of the spans found, each once, in the order found.
func (a *Activity) Spans() []string {
	var out []string
	for _, u := range a.Uses {
		if !contains(out, u.Span) {
			out = append(out, u.Span)
		}
	}
	return out
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// FindActivity scans the stopped guest k for rips (in the vCPUs' RIPs) and
// stacks (in the words of live kernel stacks), cpus being the vCPUs'
// registers read during the same stop. Each span is reported at most once
// per thread or vCPU. It reads guest memory only.
func FindActivity(k *introspect.Kernel, cpus []hypervisor.CPUState, rips, stacks []Span) (*Activity, error) {
	return findActivity(k, cpus, threadsOf(k), rips, stacks)
}

// threadLister lists the guest's threads (tests give their own).
type threadLister func(*introspect.AddressSpace) ([]thread, error)

func findActivity(k *introspect.Kernel, cpus []hypervisor.CPUState, list threadLister, rips, stacks []Span) (*Activity, error) {
	act := &Activity{}
	for _, c := range cpus {
		for _, s := range rips {
			if s.has(c.RIP) {
				act.Uses = append(act.Uses, Use{Span: s.Name, VCPU: c.Index, Value: c.RIP})
			}
		}
	}
	if len(stacks) == 0 {
		return act, nil
	}
	as := introspect.NewAddressSpace(k.Mem, k.CR3, k.LA57) // stacks are vmalloc'd and reused: no stale cache
	threads, err := list(as)
	if err != nil {
		return nil, fmt.Errorf("listing threads: %w", err)
	}
	buf := make([]byte, pageSize)
	scan := func(who string, u Use, from, to uint64) error {
		found := map[string]bool{}
		for p := from; p < to; {
			n := min(to-p, pageSize-p%pageSize)
			if err := as.ReadVirt(p, buf[:n]); err != nil {
				return fmt.Errorf("%s: stack at %#x: %w", who, p, err)
			}
			act.StackBytes += n
			for i := uint64(0); i+8 <= n; i += 8 {
				v := binary.LittleEndian.Uint64(buf[i:])
				for _, s := range stacks {
					if s.has(v) && !found[s.Name] {
						found[s.Name] = true
						hit := u
						hit.Span, hit.Value, hit.At = s.Name, v, p+i
						act.Uses = append(act.Uses, hit)
					}
				}
			}
			p += n
		}
		return nil
	}
	onStack := map[int]bool{}
	for _, th := range threads {
		if th.stack == 0 {
			continue // an exited task whose stack is freed: nothing runs on it
		}
		act.Threads++
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
		if err := scan(fmt.Sprintf("PID %d (%s)", th.pid, th.comm), Use{VCPU: -1, PID: th.pid, Comm: th.comm}, from&^7, top); err != nil {
			return nil, err
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
		act.VCPUStacks++
		if err := scan(fmt.Sprintf("vCPU %d", c.Index), Use{VCPU: c.Index}, c.RSP&^7, end); err != nil {
			return nil, err
		}
	}
	return act, nil
}
