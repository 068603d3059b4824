package introspect

import (
	"fmt"
	"sync"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
)

// A guest controls all of its memory, so what reading it costs is decided
// by the guest. Every operation that parses guest data runs under a Budget:
// the wall-clock time it may take (parsing is single-threaded, so this also
// bounds its CPU time) and the guest memory it may read. A guest that
// exceeds it gets a *BudgetError, and the caller (hvpatchd serving many
// guests) moves on.

// Budget bounds one operation on a guest.
type Budget struct {
	Time  time.Duration // wall-clock time; 0: no limit
	Bytes uint64        // guest memory read; 0: no limit
}

// DefaultAttachBudget bounds Open. A real attach reads the kernel's
// .rodata or at most its image (tens of MiB) plus a few page tables, in
// tens of milliseconds (bench/REPORT.md: 30 ms); the limits leave two
// orders of magnitude of room.
var DefaultAttachBudget = Budget{Time: 20 * time.Second, Bytes: 1 << 30}

// DefaultWalkBudget bounds one walk (Tasks, Modules). A guest with 100,000
// processes reads about 1 GiB of task_structs (the span of the fields
// read, ~10 KiB each); reads from guest RAM run at GB/s.
var DefaultWalkBudget = Budget{Time: 20 * time.Second, Bytes: 4 << 30}

// BudgetError reports an operation stopped because the guest made it cost
// more than its budget.
type BudgetError struct {
	Op    string // "attach", "task walk", ...
	What  string // "time" or "bytes read"
	Limit string
}

func (e *BudgetError) Error() string {
	return fmt.Sprintf("introspect: %s exceeded its budget of %s (%s): the guest's memory makes it too expensive, giving up",
		e.Op, e.Limit, e.What)
}

// budgetMem is a PhysMem that charges every read to a budget.
type budgetMem struct {
	hypervisor.PhysMem
	op    string
	b     Budget
	start time.Time

	mu   sync.Mutex
	read uint64
}

func newBudgetMem(mem hypervisor.PhysMem, op string, b Budget) *budgetMem {
	return &budgetMem{PhysMem: mem, op: op, b: b, start: time.Now()}
}

// charge accounts for n more bytes, failing if the budget is spent.
func (m *budgetMem) charge(n uint64) error {
	if m.b.Time > 0 && time.Since(m.start) > m.b.Time {
		return &BudgetError{Op: m.op, What: "time", Limit: m.b.Time.String()}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.b.Bytes > 0 && (n > m.b.Bytes || m.read > m.b.Bytes-n) {
		return &BudgetError{Op: m.op, What: "bytes read", Limit: fmt.Sprintf("%d bytes", m.b.Bytes)}
	}
	m.read += n
	return nil
}

// check fails if the time is spent or n more bytes would not fit (for
// callers about to allocate a buffer of n bytes).
func (m *budgetMem) check(n uint64) error {
	if err := m.charge(0); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.b.Bytes > 0 && (n > m.b.Bytes || m.read > m.b.Bytes-n) {
		return &BudgetError{Op: m.op, What: "bytes read", Limit: fmt.Sprintf("%d bytes", m.b.Bytes)}
	}
	return nil
}

func (m *budgetMem) ReadPhys(gpa uint64, p []byte) error {
	if err := m.charge(uint64(len(p))); err != nil {
		return err
	}
	return m.PhysMem.ReadPhys(gpa, p)
}

// Close does not close the memory: the budget is a view of it.
func (m *budgetMem) Close() error { return nil }

func orDefault(b, def Budget) Budget {
	if b == (Budget{}) {
		return def
	}
	return b
}
