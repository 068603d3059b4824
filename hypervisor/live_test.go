package hypervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// liveGuest is a booted test guest with an open hypervisor handle.
type liveGuest struct {
	g   *testguest.Guest
	c   *Conn
	d   *Domain
	ctx context.Context
}

func startGuest(t *testing.T, opt testguest.Options) *liveGuest {
	t.Helper()
	g := testguest.Start(t, opt) // testguest.Need gates it
	lg, err := openLive(t, g)
	if err != nil {
		t.Fatal(err)
	}
	return lg
}

func openLive(tb testing.TB, g *testguest.Guest) (*liveGuest, error) {
	ctx := context.Background()
	c, err := Connect(ctx, Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		return nil, err
	}
	tb.Cleanup(func() { c.Close() })
	d, err := c.LookupDomain(ctx, g.Name)
	if err != nil {
		return nil, err
	}
	return &liveGuest{g: g, c: c, d: d, ctx: ctx}, nil
}

func kernels(t *testing.T) []testguest.Kernel {
	t.Helper()
	testguest.Need(t)
	// Both supported series must be there: a run on fewer kernels must
	// not pass quietly. The set is fixed for the run (testguest.Kernels).
	ks, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"6.1", "6.12"} {
		if !slices.ContainsFunc(ks, func(k testguest.Kernel) bool { return k.Series == s }) {
			t.Fatalf("no %s guest kernel among %+v", s, ks)
		}
	}
	return ks
}

// xp reads guest-physical memory with the monitor's own "xp" command: the
// reference every backend is compared with.
func xp(t *testing.T, lg *liveGuest, gpa uint64, n int) []byte {
	t.Helper()
	out, err := lg.d.HMP(lg.ctx, fmt.Sprintf("xp /%dxb %#x", n, gpa))
	if err != nil {
		t.Fatal(err)
	}
	var b []byte
	for _, line := range strings.Split(out, "\n") {
		_, vals, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		for _, f := range strings.Fields(vals) {
			v, err := strconv.ParseUint(f, 0, 8)
			if err != nil {
				t.Fatalf("xp %#x: unexpected output %q", gpa, line)
			}
			b = append(b, byte(v))
		}
	}
	if len(b) != n {
		t.Fatalf("xp /%dxb %#x gave %d bytes:\n%s", n, gpa, len(b), out)
	}
	return b
}

// TestLive checks the monitor-derived facts about a running guest, one
// guest per kernel shared by the subtests.
func TestLive(t *testing.T) {
	for _, k := range kernels(t) {
		t.Run(k.Series, func(t *testing.T) {
			t.Parallel()
			lg := startGuest(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
			t.Run("Domain", func(t *testing.T) { testDomainFacts(t, lg) })
			t.Run("CPUs", func(t *testing.T) { testCPUs(t, lg) })
			t.Run("ReadVsXP", func(t *testing.T) { testReadVsXP(t, lg, 0) })
			t.Run("Freeze", func(t *testing.T) { testFreezers(t, lg) })
			t.Run("FreezeSurvivesKill", func(t *testing.T) { testFreezeSurvivesKill(t, lg) })
			t.Run("CodeWriters", func(t *testing.T) { testCodeWriters(t, lg) })
			t.Run("GdbstubSurvivesKill", func(t *testing.T) { testGdbstubSurvivesKill(t, lg) })
			t.Run("Dump", func(t *testing.T) { testDump(t, lg) })
		})
	}
}

// TestAbove4G reads RAM above 4 GiB on a 4 GiB guest, after the guest
// filled memory with random data (the page allocator prefers ZONE_NORMAL,
// which is all above 4 GiB here).
func TestAbove4G(t *testing.T) {
	for _, k := range kernels(t) {
		t.Run(k.Series, func(t *testing.T) {
			t.Parallel()
			lg := startGuest(t, testguest.Options{Kernel: k, VCPUs: 1, MemoryMiB: 4096})
			regs, err := lg.d.MemoryMap(lg.ctx)
			if err != nil {
				t.Fatal(err)
			}
			var total, high uint64
			for _, r := range regs {
				total += r.Size
				if r.GPA >= 1<<32 {
					high += r.Size
				}
			}
			t.Logf("memory map: %v", regs)
			if total != 4096<<20 || high == 0 {
				t.Fatalf("memory map of a 4096 MiB guest: %d MiB RAM, %d MiB above 4 GiB; want 4096 and >0", total>>20, high>>20)
			}
			lg.g.MustRun("dd if=/dev/urandom of=/tmp/fill bs=1M count=96 2>/dev/null; sync")
			testReadVsXP(t, lg, 1<<32)
		})
	}
}

func testDomainFacts(t *testing.T, lg *liveGuest) {
	ctx, d, g := lg.ctx, lg.d, lg.g
	if d.Name() != g.Name || d.UUID() != g.UUID {
		t.Errorf("domain handle says %s/%s, testguest says %s/%s", d.Name(), d.UUID(), g.Name, g.UUID)
	}
	byUUID, err := lg.c.LookupDomain(ctx, strings.ToUpper(g.UUID))
	if err != nil || byUUID.Name() != g.Name {
		t.Errorf("lookup by UUID %s: %v, %v", g.UUID, byUUID, err)
	}
	if _, err := lg.c.LookupDomain(ctx, "hvpatch-no-such-domain"); err == nil || !strings.Contains(err.Error(), "hvpatch-no-such-domain") {
		t.Errorf("lookup of a missing domain: err = %v, want one naming it", err)
	}
	if st, err := d.State(ctx); err != nil || st != "running" {
		t.Errorf("state = %q, %v; want running", st, err)
	}
	infos, err := lg.c.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, in := range infos {
		if in.Name == g.Name {
			found = in.UUID == g.UUID && in.State == "running" && in.ID > 0
		}
	}
	if !found {
		t.Errorf("Domains() does not list %s as running with its UUID: %+v", g.Name, infos)
	}
	pid, err := d.QEMUPid(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tids, err := d.VCPUThreads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(tids) != g.VCPUs {
		t.Errorf("%d vCPU threads, guest has %d vCPUs", len(tids), g.VCPUs)
	}
	for _, tid := range tids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", pid, tid)); err != nil {
			t.Errorf("vCPU thread %d is not a thread of QEMU %d: %v", tid, pid, err)
		}
	}
	if acc, err := d.Accel(ctx); err != nil || acc != g.Accel {
		t.Errorf("accel = %q, %v; testguest booted it with %q", acc, err, g.Accel)
	}
	regs, err := d.MemoryMap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var total uint64
	for _, r := range regs {
		total += r.Size
	}
	if total != 512<<20 || regs[0].GPA != 0 {
		t.Errorf("memory map %v: %d MiB of RAM from %#x, want 512 MiB from 0", regs, total>>20, regs[0].GPA)
	}
	var qe *QMPError
	if err := d.QMP(ctx, "no-such-command", nil, nil); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("unknown QMP command: err = %v, want a CommandNotFound QMPError", err)
	}
}

func testCPUs(t *testing.T, lg *liveGuest) {
	cpus, err := lg.d.CPUs(lg.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(cpus) != lg.g.VCPUs {
		t.Fatalf("%d CPUs from info registers, guest has %d", len(cpus), lg.g.VCPUs)
	}
	regs, _ := lg.d.MemoryMap(lg.ctx)
	for i, c := range cpus {
		if c.Index != i {
			t.Errorf("CPU %d has index %d", i, c.Index)
		}
		// A booted 64-bit Linux: paging on, long mode active, PAE.
		if c.CR0&(1<<31) == 0 || c.EFER&(1<<10) == 0 || c.CR4&CR4PAE == 0 {
			t.Errorf("CPU %d: CR0=%#x EFER=%#x CR4=%#x, not a long-mode paging CPU", i, c.CR0, c.EFER, c.CR4)
		}
		if findRegion(regs, c.CR3&^0xfff) < 0 {
			t.Errorf("CPU %d: CR3 %#x is not in guest RAM %v", i, c.CR3, regs)
		}
		if c.IDTBase>>47 != 0x1ffff || c.GDTBase>>47 != 0x1ffff {
			t.Errorf("CPU %d: IDT %#x / GDT %#x are not kernel addresses", i, c.IDTBase, c.GDTBase)
		}
		if c.InKernel() && (c.RIP>>47 != 0x1ffff || c.GSBase>>47 != 0x1ffff) {
			t.Errorf("CPU %d in kernel mode with RIP %#x, GS base %#x", i, c.RIP, c.GSBase)
		}
	}
}

// testReadVsXP compares every backend with HMP xp at random addresses of
// a paused guest (so memory cannot change between the reads). With
// minHigh > 0, half of the samples are at or above it.
func testReadVsXP(t *testing.T, lg *liveGuest, minHigh uint64) {
	ctx, d := lg.ctx, lg.d
	backends := map[string]PhysMem{}
	for _, b := range []string{"memfd", "process"} {
		m, err := d.OpenPhysMem(ctx, b)
		if err != nil {
			t.Fatalf("backend %s: %v", b, err)
		}
		defer m.Close()
		backends[b] = m
	}
	regs := backends["memfd"].Regions()
	if err := d.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d.Resume(ctx); err != nil {
			t.Error(err)
		}
	}()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	const samples = 120
	nonzero, high := 0, 0
	for i := 0; i < samples; i++ {
		var r Region
		for {
			r = regs[rng.IntN(len(regs))]
			if minHigh == 0 || (i%2 == 0) == (r.GPA >= minHigh) {
				break
			}
		}
		n := 1 + rng.IntN(256)
		if uint64(n) > r.Size {
			n = int(r.Size)
		}
		gpa := r.GPA + rng.Uint64N(r.Size-uint64(n)+1)
		// Every other sample goes where the memfd backend sees data, so
		// the comparison is not mostly zeros against zeros (xp is
		// independent: a wrong mapping still shows as a difference).
		for try := 0; i%4 < 2 && try < 500; try++ {
			probe := make([]byte, n)
			if backends["memfd"].ReadPhys(gpa, probe) == nil && !bytes.Equal(probe, make([]byte, n)) {
				break
			}
			gpa = r.GPA + rng.Uint64N(r.Size-uint64(n)+1)
		}
		want := xp(t, lg, gpa, n)
		if gpa >= minHigh && minHigh > 0 {
			high++
		}
		if !bytes.Equal(want, make([]byte, n)) {
			nonzero++
		}
		for name, m := range backends {
			got := make([]byte, n)
			if err := m.ReadPhys(gpa, got); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s: %d bytes at %#x differ from xp:\n got %x\nwant %x", name, n, gpa, got, want)
			}
		}
	}
	t.Logf("%d random reads (%d at or above %#x), %d of them not all zero: all backends equal xp", samples, high, minHigh, nonzero)
	if nonzero < samples/3 {
		t.Errorf("only %d of %d samples hold data: the comparison proves little", nonzero, samples)
	}
	// Accesses touching a hole fail as a whole and name the address.
	last := regs[len(regs)-1]
	for name, m := range backends {
		buf := make([]byte, 32)
		err := m.ReadPhys(last.End()-16, buf)
		var ae *AccessError
		if !errors.As(err, &ae) || !strings.Contains(err.Error(), fmt.Sprintf("%#x", last.End())) {
			t.Errorf("%s: read across the end of RAM at %#x: err = %v, want an AccessError naming %#x", name, last.End()-16, err, last.End())
		}
	}
}
