package patcher

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
)

// fixtureKernel is guest memory captured from a booted test guest (HMP "x"
// of a few functions and the notes section, and /proc/kallsyms entries);
// see testdata/README.
type fixtureKernel struct {
	Release        string `json:"release"`
	VmlinuxBuildID string `json:"vmlinux_build_id"`
	Symbols        []struct {
		Name string `json:"name"`
		Addr string `json:"addr"`
		Size uint64 `json:"size"`
	} `json:"symbols"`
	Memory       []fixtureRun `json:"memory"`
	TracedMemory []fixtureRun `json:"traced_memory"`
}

type fixtureRun struct {
	Addr string `json:"addr"`
	Hex  string `json:"hex"`
}

// fakeTarget is a Target over sparse memory. Reads of bytes it does not
// hold fail, like reads of unmapped guest memory.
type fakeTarget struct {
	mu      sync.Mutex
	release string
	syms    map[string][]Symbol
	mem     map[uint64]byte
	fix     *fixtureKernel
}

func loadFixture(t testing.TB, series string) *fakeTarget {
	t.Helper()
	b, err := os.ReadFile("testdata/kernel-" + series + ".json")
	if err != nil {
		t.Fatal(err)
	}
	var fix fixtureKernel
	if err := json.Unmarshal(b, &fix); err != nil {
		t.Fatal(err)
	}
	ft := &fakeTarget{release: fix.Release, syms: map[string][]Symbol{}, mem: map[uint64]byte{}, fix: &fix}
	for _, s := range fix.Symbols {
		a, err := strconv.ParseUint(s.Addr, 0, 64)
		if err != nil {
			t.Fatal(err)
		}
		ft.syms[s.Name] = append(ft.syms[s.Name], Symbol{Name: s.Name, Addr: a, Size: s.Size})
	}
	ft.load(t, fix.Memory)
	return ft
}

func (f *fakeTarget) load(t testing.TB, runs []fixtureRun) {
	for _, r := range runs {
		a, err := strconv.ParseUint(r.Addr, 0, 64)
		if err != nil {
			t.Fatal(err)
		}
		b, err := hex.DecodeString(r.Hex)
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range b {
			f.mem[a+uint64(i)] = c
		}
	}
}

func (f *fakeTarget) sym(t testing.TB, name string) Symbol {
	t.Helper()
	s := f.syms[name]
	if len(s) != 1 {
		t.Fatalf("fixture has %d symbols %s", len(s), name)
	}
	return s[0]
}

func (f *fakeTarget) Release() string              { return f.release }
func (f *fakeTarget) Symbols(name string) []Symbol { return f.syms[name] }
func (f *fakeTarget) Describe(addr uint64) string {
	for _, ss := range f.syms {
		for _, s := range ss {
			if addr >= s.Addr && addr < s.Addr+max(s.Size, 1) {
				return fmt.Sprintf("%s+%#x", s.Name, addr-s.Addr)
			}
		}
	}
	return ""
}

func (f *fakeTarget) ReadVirt(va uint64, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range p {
		c, ok := f.mem[va+uint64(i)]
		if !ok {
			return fmt.Errorf("virtual address %#x: not in the fixture", va+uint64(i))
		}
		p[i] = c
	}
	return nil
}

// The fake maps kernel text with 2 MiB pages at a fixed offset.
const fakePhysOffset = 0xffffffff80000000

func (f *fakeTarget) Translate(va uint64) (uint64, uint64, error) {
	if va < fakePhysOffset {
		return 0, 0, fmt.Errorf("virtual address %#x not mapped", va)
	}
	return va - fakePhysOffset, 2 << 20, nil
}

// snapshot copies all memory, for before/after comparisons.
func (f *fakeTarget) snapshot() map[uint64]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := make(map[uint64]byte, len(f.mem))
	for k, v := range f.mem {
		m[k] = v
	}
	return m
}

func (f *fakeTarget) requireUnchanged(t testing.TB, before map[uint64]byte) {
	t.Helper()
	after := f.snapshot()
	var diff []uint64
	for k, v := range before {
		if after[k] != v {
			diff = append(diff, k)
		}
	}
	sort.Slice(diff, func(i, j int) bool { return diff[i] < diff[j] })
	if len(diff) > 0 || len(after) != len(before) {
		t.Fatalf("guest memory changed at %d address(es), first %#x", len(diff), diff)
	}
}

func (f *fakeTarget) read(t testing.TB, va uint64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := f.ReadVirt(va, b); err != nil {
		t.Fatal(err)
	}
	return b
}

// fakeWriter freezes nothing; it writes the fake's memory by guest-physical
// address, and can be told to fail.
type fakeWriter struct {
	t          *fakeTarget
	failWriteN int // fail the Nth write (1-based); 0 never
	corruptN   int // the Nth write stores something else
	panicN     int // panic in the Nth write
	rips       []uint64
	stops      int
	resumes    int
	writes     int
	stopErr    error
	hold       chan struct{} // if set, Stop waits for it to be closed
	beforeStop func()        // runs at the start of Stop
}

func (w *fakeWriter) Name() string { return "fake" }

// Capabilities: the fake reads registers during its stops when it was
// given RIPs.
func (w *fakeWriter) Capabilities() hypervisor.Capabilities {
	return hypervisor.Capabilities{Registers: w.rips != nil}
}

func (w *fakeWriter) Stop(ctx context.Context) (StoppedGuest, error) {
	if w.beforeStop != nil {
		w.beforeStop()
	}
	if w.hold != nil {
		<-w.hold
	}
	if w.stopErr != nil {
		return nil, w.stopErr
	}
	w.stops++
	return &fakeStopped{w}, nil
}

type fakeStopped struct{ w *fakeWriter }

func (s *fakeStopped) Read(va, gpa uint64, p []byte) error {
	if gpa != va-fakePhysOffset {
		return fmt.Errorf("fake: gpa %#x does not belong to va %#x", gpa, va)
	}
	return s.w.t.ReadVirt(va, p)
}

func (s *fakeStopped) Write(va, gpa uint64, data []byte) error {
	w := s.w
	w.writes++
	if w.writes == w.panicN {
		panic("fake writer panics")
	}
	if w.writes == w.failWriteN {
		return fmt.Errorf("fake write failure")
	}
	if gpa != va-fakePhysOffset {
		return fmt.Errorf("fake: gpa %#x does not belong to va %#x", gpa, va)
	}
	w.t.mu.Lock()
	defer w.t.mu.Unlock()
	for i, c := range data {
		if w.writes == w.corruptN {
			c ^= 0xff
		}
		w.t.mem[va+uint64(i)] = c
	}
	return nil
}

func (s *fakeStopped) Resume() (FreezeReport, error) {
	s.w.resumes++
	return FreezeReport{Window: 42 * time.Microsecond, Method: "fake", VCPUs: 2}, nil
}

func (s *fakeStopped) Registers(ctx context.Context) ([]hypervisor.CPUState, error) {
	if s.w.rips == nil {
		return nil, hypervisor.ErrNoRegisters
	}
	cpus := make([]hypervisor.CPUState, len(s.w.rips))
	for i, rip := range s.w.rips {
		cpus[i] = hypervisor.CPUState{Index: i, RIP: rip}
	}
	return cpus, nil
}
