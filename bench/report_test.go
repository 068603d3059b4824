// Package bench measures hvpatch against the baselines an operator would
// otherwise use, side by side in one run on the same guests, and writes
// bench/REPORT.md and bench/REPORT.json.
//
// `make bench` runs the full report (HVPATCH_BENCH=full); `make test` runs
// the same code with a few iterations and writes to a temporary directory,
// so the report keeps working without slowing CI down.
package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/fixbuild"
	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/benchreport"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/patcher"
)

var full = os.Getenv("HVPATCH_BENCH") == "full"

// runs picks the sample count for the mode.
func runs(fullRuns, shortRuns int) int {
	if full {
		return fullRuns
	}
	return shortRuns
}

// guest is a booted test guest opened through hvpatch's own layers.
type guest struct {
	g   *testguest.Guest
	dom *hypervisor.Domain
	mem hypervisor.PhysMem
}

func open(t *testing.T, ctx context.Context, conn *hypervisor.Conn, series string, vcpus int) *guest {
	t.Helper()
	k, err := testguest.KernelSeries(series)
	if err != nil {
		t.Fatal(err)
	}
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: vcpus})
	dom, err := conn.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := dom.OpenPhysMem(ctx, "memfd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	return &guest{g: g, dom: dom, mem: mem}
}

func (g *guest) label() string {
	return fmt.Sprintf("%s, %d vCPU", g.g.Kernel.Release, g.g.VCPUs)
}

func TestReport(t *testing.T) {
	testguest.Need(t)
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	one := open(t, ctx, conn, "6.1", 1)
	two := open(t, ctx, conn, "6.1", 2)
	newer := open(t, ctx, conn, "6.12", 2)
	four := open(t, ctx, conn, "6.1", 4)
	eight := open(t, ctx, conn, "6.1", 8)

	r := &benchreport.Report{Date: time.Now(), Mode: map[bool]string{true: "full", false: "short"}[full], Machine: benchreport.MachineFacts()}
	for _, g := range []*guest{one, two, newer, four, eight} {
		r.Guests = append(r.Guests, fmt.Sprintf("%s (%s, 512 MiB, memfd RAM)", g.label(), g.g.Accel))
	}
	r.Notes = append(r.Notes,
		"These machines are noisy (2 shared cores, TCG guests running beside the measurement): compare rows within one report, not across reports.",
		"Every row is measured in this run; each row says how many samples it took. Ratios are baseline median / row median.",
	)

	r.Notes = append(r.Notes,
		"The ptrace freeze runs on the calling goroutine's OS thread: PTRACE_SEIZE of every vCPU thread (nothing stops yet), then PTRACE_INTERRUPT of each back to back (the window starts at the first), non-blocking waits with 2-16 µs naps until all are stopped, then (by default) SCHED_FIFO for the freezing thread until it has detached them all. Rows \"no SCHED_FIFO boost\" measure the same without the boost. \"Guest-visible stop of each vCPU\" is per vCPU thread: from the moment it entered its stop (interrupt time + its run-queue wait + its run time until the stop, from /proc/PID/task/TID/schedstat) to the moment it ran again (detach time + its run-queue wait after the detach); one sample per vCPU per freeze.",
		"With more vCPUs than host cores, the window grows with the vCPU count: each interrupt and detach is one system call (about 1-2 µs), but a vCPU thread that is running must be scheduled to reach its stop, and after the detach every vCPU thread waits its turn for one of the 2 cores; the per-vCPU stop rows show how long each vCPU itself was held.",
	)
	freezeWindows(t, ctx, r, one)
	freezeWindows(t, ctx, r, two)
	freezeWindows(t, ctx, r, four)
	freezeWindows(t, ctx, r, eight)
	physReads(t, ctx, r, two)
	virtReads(t, ctx, r, two)
	for _, g := range []*guest{two, newer} {
		attach(t, ctx, r, g)
	}
	attachCached(t, ctx, r, one, two)
	psEndToEnd(t, r, two)
	returnPatch(t, ctx, r, two)
	buildTimes(t, ctx, r, two)
	t.Run("many guests", func(t *testing.T) { manyGuests(t, ctx, r) })

	r.Finish()
	checkTargets(r)
	explainTargets(r)
	checkRows(t, r)

	dir := t.TempDir()
	if full {
		dir = "."
	}
	writeReport(t, r, dir)
}

func freezeWindows(t *testing.T, ctx context.Context, r *benchreport.Report, g *guest) {
	topic := r.Topic(fmt.Sprintf("Freeze window, %d vCPU", g.g.VCPUs), "stop every vCPU, then let them run again; the window is measured host-side by each method (ptrace: from the first PTRACE_INTERRUPT to the last PTRACE_DETACH)")
	n := runs(200, 10)
	if g.g.VCPUs > 2 {
		n = runs(100, 5)
	}
	freezeRows := func(fr hypervisor.Freezer, name, base, note string, perVCPU *[]time.Duration) {
		var samples []time.Duration
		for i := 0; i < n; i++ {
			fz, err := fr.Freeze(ctx)
			if err != nil {
				t.Fatalf("%s freeze: %v", fr.Name(), err)
			}
			w, err := fz.Thaw()
			if err != nil {
				t.Fatalf("%s thaw: %v", fr.Name(), err)
			}
			samples = append(samples, w)
			if perVCPU != nil {
				for _, s := range fz.(hypervisor.VCPUStops).VCPUStops() {
					if s >= 0 {
						*perVCPU = append(*perVCPU, s)
					}
				}
			}
			time.Sleep(time.Millisecond) // let the guest run between samples
		}
		topic.Add(name, samples, base, note)
	}
	pf, err := g.dom.PtraceFreezer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noBoost, err := g.dom.PtraceFreezerWith(ctx, hypervisor.PtraceOptions{NoBoost: true})
	if err != nil {
		t.Fatal(err)
	}
	perVCPU, err := g.dom.PtraceFreezerWith(ctx, hypervisor.PtraceOptions{PerVCPU: true})
	if err != nil {
		t.Fatal(err)
	}
	const suspend = "libvirt suspend/resume"
	freezeRows(pf, "ptrace freeze + thaw", suspend, "", nil)
	freezeRows(noBoost, "ptrace freeze + thaw, no SCHED_FIFO boost", suspend, "", nil)
	var stops []time.Duration
	freezeRows(perVCPU, "ptrace freeze + thaw, measuring each vCPU", suspend, "schedstat reads inside the window", &stops)
	topic.Add("guest-visible stop of each vCPU", stops, suspend, "per vCPU: entered its stop → ran again, from the kernel's schedstat")
	freezeRows(g.dom.SuspendFreezer(), suspend, "", "", nil)
	waitRunning(t, ctx, g.dom)

	h := startHogs(t)
	const hogged = ", CPU hog on every host core"
	freezeRows(pf, "ptrace freeze + thaw"+hogged, suspend+hogged, "", nil)
	freezeRows(noBoost, "ptrace freeze + thaw, no SCHED_FIFO boost"+hogged, suspend+hogged, "", nil)
	stops = nil
	freezeRows(perVCPU, "ptrace freeze + thaw, measuring each vCPU"+hogged, suspend+hogged, "", &stops)
	topic.Add("guest-visible stop of each vCPU"+hogged, stops, suspend+hogged, "")
	freezeRows(g.dom.SuspendFreezer(), suspend+hogged, "", "", nil)
	h.stop()
	waitRunning(t, ctx, g.dom)
	if g.g.VCPUs > 2 {
		return
	}
	cw, err := g.dom.NewCodeWriter(ctx, "gdbstub", g.mem)
	if err != nil {
		t.Fatal(err)
	}
	var samples []time.Duration
	for i := 0; i < runs(50, 5); i++ {
		sg, err := cw.Stop(ctx)
		if err != nil {
			st, _ := g.dom.State(ctx)
			rs, _ := g.dom.RunStatus(ctx)
			t.Fatalf("gdbstub attach %d: %v (libvirt %s, qemu %s)", i, err, st, rs)
		}
		rep, err := sg.Resume()
		if err != nil {
			t.Fatalf("gdbstub detach: %v", err)
		}
		samples = append(samples, rep.Window)
	}
	if s, ok := cw.(interface{ Settle() error }); ok {
		if err := s.Settle(); err != nil {
			t.Fatalf("gdbstub: %v", err)
		}
	}
	topic.Add("gdbstub attach + detach", samples, suspend, "the TCG writer's stop")
}

// waitRunning waits until libvirt reports the domain running again: it
// learns of QEMU's resume asynchronously, after DomainResume returns.
func waitRunning(t *testing.T, ctx context.Context, d *hypervisor.Domain) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		state, err := d.State(ctx)
		if err == nil && state == "running" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("domain %s still %q (%v) 5 s after resume", d.Name(), state, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func physReads(t *testing.T, ctx context.Context, r *benchreport.Report, g *guest) {
	regions, err := g.dom.MemoryMap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 11))
	randomPage := func(size uint64) uint64 {
		for {
			reg := regions[rng.IntN(len(regions))]
			if reg.Size > size {
				return (reg.GPA + rng.Uint64N(reg.Size-size)) &^ 0xfff
			}
		}
	}
	process, err := g.dom.OpenPhysMem(ctx, "process")
	if err != nil {
		t.Fatal(err)
	}
	defer process.Close()
	peek := peekMem{g.dom, ctx}
	for _, size := range []uint64{4096, 1 << 20} {
		name := "4 KiB random read"
		if size > 4096 {
			name = "1 MiB sequential read"
		}
		topic := r.Topic("Guest-physical reads: "+name, name+" of guest RAM, from a working set of 256 random places read once before sampling (warm), unless the row says first touch")
		buf := make([]byte, size)
		set := make([]uint64, 256)
		for i := range set {
			set[i] = randomPage(size)
		}
		for _, b := range []struct {
			name string
			mem  interface{ ReadPhys(uint64, []byte) error }
			n    int
		}{
			{"memfd mmap", g.mem, runs(20000, 200)},
			{"process_vm_readv", process, runs(20000, 200)},
			{"libvirt DomainMemoryPeek", peek, runs(50, 3)},
		} {
			n := b.n
			if size > 4096 && n > 500 {
				n /= 20
			}
			if b.n > 100 {
				for _, addr := range set {
					if err := b.mem.ReadPhys(addr, buf); err != nil {
						t.Fatalf("%s read at %#x: %v", b.name, addr, err)
					}
				}
			}
			samples := make([]time.Duration, 0, n)
			for i := 0; i < n; i++ {
				addr := set[rng.IntN(len(set))]
				t0 := time.Now()
				if err := b.mem.ReadPhys(addr, buf); err != nil {
					t.Fatalf("%s read at %#x: %v", b.name, addr, err)
				}
				samples = append(samples, time.Since(t0))
			}
			base := "libvirt DomainMemoryPeek"
			if b.name == base {
				base = ""
			}
			topic.Add(b.name, samples, base, "")
		}
		// The first read of a page through a new mapping faults it into
		// this process: what a one-off read of a cold page costs.
		fresh, err := g.dom.OpenPhysMem(ctx, "memfd")
		if err != nil {
			t.Fatal(err)
		}
		n := runs(2000, 100)
		if size > 4096 {
			n = runs(100, 10)
		}
		samples := make([]time.Duration, 0, n)
		for i := 0; i < n; i++ {
			addr := randomPage(size)
			t0 := time.Now()
			if err := fresh.ReadPhys(addr, buf); err != nil {
				t.Fatalf("memfd first touch at %#x: %v", addr, err)
			}
			samples = append(samples, time.Since(t0))
		}
		fresh.Close()
		topic.Add("memfd mmap, first touch", samples, "libvirt DomainMemoryPeek", "each sample a page not read before through this mapping")
	}
}

// peekMem reads through libvirt's DomainMemoryPeek in the chunks libvirt
// allows per call, as a tool without hvpatch's backends would.
type peekMem struct {
	d   *hypervisor.Domain
	ctx context.Context
}

func (p peekMem) ReadPhys(gpa uint64, buf []byte) error {
	const chunk = 64 << 10
	for off := 0; off < len(buf); off += chunk {
		end := min(off+chunk, len(buf))
		if err := p.d.MemoryPeek(p.ctx, gpa+uint64(off), buf[off:end]); err != nil {
			return err
		}
	}
	return nil
}

func virtReads(t *testing.T, ctx context.Context, r *benchreport.Report, g *guest) {
	cpus, err := g.dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	k, err := introspect.Open(ctx, g.mem, cpus)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 5))
	span := (k.TextEnd - k.TextStart) / 2 // text and rodata: mapped for sure
	n := runs(20000, 300)
	for _, size := range []int{8, 4096} {
		topic := r.Topic(fmt.Sprintf("Guest-virtual reads through the page walker, %d bytes", size),
			fmt.Sprintf("%d-byte read at a random page of kernel text/rodata, translated through the guest's page tables", size))
		virtReadRows(t, topic, k, rng, span, make([]byte, size), n)
	}
}

func virtReadRows(t *testing.T, topic *benchreport.Topic, k *introspect.Kernel, rng *rand.Rand, span uint64, buf []byte, n int) {
	for _, cached := range []bool{true, false} {
		samples := make([]time.Duration, 0, n)
		for i := 0; i < n; i++ {
			va := (k.TextStart + rng.Uint64N(span)) &^ 0xfff
			if !cached {
				k.AS.Flush()
			}
			t0 := time.Now()
			if err := k.AS.ReadVirt(va, buf); err != nil {
				t.Fatalf("read %#x: %v", va, err)
			}
			samples = append(samples, time.Since(t0))
		}
		if cached {
			topic.Add("with translation cache", samples, "without translation cache", "")
		} else {
			topic.Add("without translation cache", samples, "", "full walk of every page")
		}
	}
}

// attachCached measures the attach of a guest whose kernel build the
// cache already holds (from another guest of the same build, with its own
// KASLR slide), against the full attach of the same guest in this run.
func attachCached(t *testing.T, ctx context.Context, r *benchreport.Report, seen, further *guest) {
	topic := r.Topic("Attach to ready", "")
	cache := &introspect.BuildCache{}
	cpus, err := seen.dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first, err := introspect.OpenCached(ctx, seen.mem, cpus, cache)
	if err != nil {
		t.Fatal(err)
	}
	if cpus, err = further.dom.CPUs(ctx); err != nil {
		t.Fatal(err)
	}
	var samples []time.Duration
	var k *introspect.Kernel
	for i := 0; i < runs(30, 3); i++ {
		t0 := time.Now()
		if k, err = introspect.OpenCached(ctx, further.mem, cpus, cache); err != nil {
			t.Fatal(err)
		}
		samples = append(samples, time.Since(t0))
	}
	if st := cache.Stats(); st.Hits != int64(len(samples)) || k.BTF == nil {
		t.Fatalf("cached attach: %+v, BTF %v", st, k.BTF != nil)
	}
	topic.Add(further.g.Kernel.Release+", further guest of a seen build", samples, further.g.Kernel.Release,
		fmt.Sprintf("build cache hit: symbols and BTF shared; slide %#x, the cached guest's %#x", k.Slide, first.Slide))
}

func attach(t *testing.T, ctx context.Context, r *benchreport.Report, g *guest) {
	topic := r.Topic("Attach to ready", "from an open PhysMem and the vCPU registers to the kernel located, all kallsyms decoded and BTF parsed")
	cpus, err := g.dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var k *introspect.Kernel
	var samples []time.Duration
	for i := 0; i < runs(30, 3); i++ {
		t0 := time.Now()
		k, err = introspect.Open(ctx, g.mem, cpus)
		if err != nil {
			t.Fatal(err)
		}
		if k.BTF == nil || k.Symbols.Len() < 50000 {
			t.Fatalf("%s: attach gave BTF=%v, %d symbols", g.label(), k.BTF != nil, k.Symbols.Len())
		}
		samples = append(samples, time.Since(t0))
	}
	topic.Add(g.g.Kernel.Release, samples, "", fmt.Sprintf("%d symbols", k.Symbols.Len()))
}

// psEndToEnd runs the real CLI binary, as an operator would.
func psEndToEnd(t *testing.T, r *benchreport.Report, g *guest) {
	bin := filepath.Join(t.TempDir(), "hvpatch")
	build := exec.Command("go", "build", "-o", bin, "../cmd/hvpatch")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building hvpatch: %v\n%s", err, out)
	}
	topic := r.Topic("hvpatch ps, end to end", "run `hvpatch ps DOMAIN --json` as a new process: connect to libvirt, open memory, attach, walk the task list, print")
	var samples []time.Duration
	var tasks int
	for i := 0; i < runs(20, 2); i++ {
		t0 := time.Now()
		out, err := exec.Command(bin, "ps", g.g.Name, "--json").Output()
		if err != nil {
			t.Fatalf("hvpatch ps: %v", err)
		}
		samples = append(samples, time.Since(t0))
		var list []json.RawMessage
		if err := json.Unmarshal(out, &list); err != nil {
			var wrapped map[string]json.RawMessage
			if err2 := json.Unmarshal(out, &wrapped); err2 != nil {
				t.Fatalf("hvpatch ps --json: %v\n%s", err, out)
			}
		}
		tasks = max(tasks, len(list))
	}
	topic.Add("hvpatch ps", samples, "", fmt.Sprintf("%s; %d processes", g.label(), tasks))
}

// buildTimes measures `hvpatch build` of a small fix for the guest's exact
// kernel build: with the source tree already prepared (cached), and, in the
// full report, from an empty cache (download, extract, configure, prepare,
// then the build), which is what the first fix for a new kernel build costs.
func buildTimes(t *testing.T, ctx context.Context, r *benchreport.Report, g *guest) {
	cpus, err := g.dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	k, err := introspect.Open(ctx, g.mem, cpus)
	if err != nil {
		t.Fatal(err)
	}
	gk := fixbuild.Guest{Banner: k.Banner, Release: k.Release, Symbols: k.Symbols, Read: k.AS.ReadVirt, ModuleSymbols: k.ModuleSymbols}
	if gk.BuildID, err = patcher.BuildID(patcher.KernelTarget{K: k}); err != nil {
		t.Fatal(err)
	}
	diff, err := os.ReadFile("../fixbuild/testdata/version-marker.diff")
	if err != nil {
		t.Fatal(err)
	}
	build := func(cache string) (*fixbuild.Result, time.Duration) {
		t0 := time.Now()
		res, err := fixbuild.Build(ctx, gk, diff, fixbuild.Options{OutDir: t.TempDir(), Cache: cache, DiffName: "version-marker.diff"})
		if err != nil {
			t.Fatal(err)
		}
		return res, time.Since(t0)
	}
	topic := r.Topic("hvpatch build", "one build of testdata's fs/proc/version.c fix for "+k.Release+": identify, source tree, three compiles, verify, diff, extract, bundle")
	build("") // make sure the default cache holds the tree
	var samples []time.Duration
	var res *fixbuild.Result
	for i := 0; i < runs(5, 1); i++ {
		var d time.Duration
		res, d = build("")
		samples = append(samples, d)
	}
	topic.Add("cached source tree", samples, "", fmt.Sprintf("%d function(s) changed", len(res.Functions)))
	if full {
		cache := t.TempDir()
		_, d := build(cache)
		topic.Add("cold: empty cache", []time.Duration{d}, "cached source tree", "download, extract, configure and prepare included")
		os.RemoveAll(cache)
	}
}

func checkTargets(r *benchreport.Report) {
	if row, ok := r.Row("hvpatch build", "cached source tree"); ok {
		r.Targets = append(r.Targets, benchreport.Target{What: "hvpatch build with a cached source tree < 20 s", Met: row.Stats.Median < 20*time.Second, Detail: benchreport.FormatDuration(row.Stats.Median)})
	}
	if row, ok := r.Row("hvpatch build", "cold: empty cache"); ok {
		r.Targets = append(r.Targets, benchreport.Target{What: "hvpatch build from an empty cache < 3 min", Met: row.Stats.Median < 3*time.Minute, Detail: benchreport.FormatDuration(row.Stats.Median)})
	}
	us := func(d time.Duration) string { return benchreport.FormatDuration(d) }
	vs := func(row benchreport.Row, what string) string {
		return fmt.Sprintf("%s× shorter than %s (%s)", strconv.FormatFloat(row.Ratio, 'f', 1, 64), what, us(time.Duration(float64(row.Stats.Median)*row.Ratio)))
	}
	const f2 = "Freeze window, 2 vCPU"
	if row, ok := r.Row(f2, "ptrace freeze + thaw"); ok {
		r.Targets = append(r.Targets,
			benchreport.Target{What: "ptrace freeze median < 50 µs, 2 vCPUs, quiet host", Met: row.Stats.Median < 50*time.Microsecond,
				Detail: fmt.Sprintf("%s (p99 %s)", us(row.Stats.Median), us(row.Stats.P99)), VsBaseline: vs(row, "libvirt suspend/resume")},
			benchreport.Target{What: "ptrace freeze ≥ 100× shorter than suspend/resume, 2 vCPUs", Met: row.Ratio >= 100,
				Detail: fmt.Sprintf("%.0f×", row.Ratio), VsBaseline: vs(row, "libvirt suspend/resume")})
	}
	if row, ok := r.Row(f2, "ptrace freeze + thaw, CPU hog on every host core"); ok {
		r.Targets = append(r.Targets, benchreport.Target{What: "ptrace freeze median < 200 µs, 2 vCPUs, CPU hog on every host core", Met: row.Stats.Median < 200*time.Microsecond,
			Detail: fmt.Sprintf("%s (p99 %s)", us(row.Stats.Median), us(row.Stats.P99)), VsBaseline: vs(row, "suspend/resume with the same hogs")})
	}
	if row, ok := r.Row(f2, "guest-visible stop of each vCPU"); ok {
		r.Targets = append(r.Targets, benchreport.Target{What: "(reported) guest-visible stop per vCPU, 2 vCPUs, quiet", Met: true,
			Detail: fmt.Sprintf("%s (p99 %s)", us(row.Stats.Median), us(row.Stats.P99)), VsBaseline: vs(row, "libvirt suspend/resume")})
	}
	if row, ok := r.Row(f2, "gdbstub attach + detach"); ok {
		r.Targets = append(r.Targets, benchreport.Target{What: "gdbstub (TCG) writer's stop ≥ 2× shorter than suspend/resume, 2 vCPUs", Met: row.Ratio >= 2,
			Detail: fmt.Sprintf("%s, %.2f×", us(row.Stats.Median), row.Ratio), VsBaseline: vs(row, "libvirt suspend/resume")})
	}
	if row, ok := r.Row("Return patch, apply + revert", "direct+ptrace"); ok {
		t := benchreport.Target{What: "whole return-patch apply, direct+ptrace (KVM path) < 100 µs median", Met: row.Stats.Median < 100*time.Microsecond,
			Detail: us(row.Stats.Median), VsBaseline: vs(row, "direct+suspend")}
		if shm, ok := r.Row("Return patch, apply + revert", "direct+ptrace, journal on tmpfs"); ok {
			t.Detail += fmt.Sprintf("; %s with the journal on tmpfs", us(shm.Stats.Median))
		}
		r.Targets = append(r.Targets, t)
	}
	for _, topic := range r.Topics {
		if topic.Name != "Attach to ready" {
			continue
		}
		for _, row := range topic.Rows {
			if strings.HasSuffix(row.Name, "further guest of a seen build") {
				r.Targets = append(r.Targets, benchreport.Target{What: "attach of a further guest of a seen kernel build < 5 ms", Met: row.Stats.Median < 5*time.Millisecond,
					Detail: us(row.Stats.Median), VsBaseline: vs(row, "a full attach of the same guest")})
			}
		}
	}
	if row, ok := r.Row("Guest-physical reads: 4 KiB random read", "memfd mmap"); ok {
		r.Targets = append(r.Targets, benchreport.Target{What: "4 KiB physical read ≥ 1000× faster than DomainMemoryPeek", Met: row.Ratio >= 1000, Detail: fmt.Sprintf("%.0f× (memfd)", row.Ratio)})
	}
	for _, t := range r.Topics {
		if t.Name != "Attach to ready" {
			continue
		}
		for _, row := range t.Rows {
			if strings.HasPrefix(row.Name, "6.1.") && !strings.HasSuffix(row.Name, "seen build") {
				r.Targets = append(r.Targets, benchreport.Target{What: "attach-to-ready < 200 ms (6.1)", Met: row.Stats.Median < 200*time.Millisecond, Detail: benchreport.FormatDuration(row.Stats.Median)})
			}
		}
	}
}

// explainTargets adds, for each target not met, what the same run measured
// about where the time or memory goes.
func explainTargets(r *benchreport.Report) {
	us := benchreport.FormatDuration
	for _, tab := range r.Tables {
		if tab.Name != "hvpatchd with many guests" {
			continue
		}
		var last []string
		for _, row := range tab.Rows {
			if len(row) == len(tab.Columns) && row[1] == "on" && row[0] != "1" {
				last = row
			}
		}
		if last != nil {
			r.Notes = append(r.Notes, fmt.Sprintf("The attach target is the kernel's: from the guest's memory and registers to symbols and BTF ready. hvpatchd's whole attach of a guest (%s guests: %s, first / others) is dominated by libvirt and QEMU monitor round trips (domain lookup and state, pid file, memory map, `info registers`, accelerator and vCPU thread queries; HOST-NOTES measured `info registers` alone at about 2 ms), not by the kernel; the shared build makes the kernel part under a millisecond and the memory per further guest about %s.", last[0], last[len(last)-1], last[4]))
		}
	}
	for _, tg := range r.Targets {
		if tg.Met {
			continue
		}
		switch {
		case strings.HasPrefix(tg.What, "whole return-patch apply"):
			disk, ok1 := r.Row("Return patch, apply + revert", "direct+ptrace")
			shm, ok2 := r.Row("Return patch, apply + revert", "direct+ptrace, journal on tmpfs")
			win, ok3 := r.Row("Return patch, freeze window", "direct+ptrace")
			if !ok1 || !ok2 || !ok3 {
				continue
			}
			r.Notes = append(r.Notes, fmt.Sprintf("Not met: %s. The apply (median %s) writes the journal durably twice (a pending entry before the stop, the applied entry after): each save is an fsync of the state directory, of the new file and of the directory after the rename, on this host's ext4 virtio disk. With the journal on tmpfs, where fsync costs nothing, the same apply takes %s, so about %s per apply is those six fsyncs; of the rest, %s is the freeze window, and the remainder is the two lock files, loading and checking the journal against the guest (reconcile reads the guest's bytes), planning (symbol lookup, reading and verifying the function's bytes and its fentry NOP), the /proc check of the cached vCPU threads, and the read-back. Reaching 100 µs would take a journal that is not durable before the write (a crash could then leave a patch in guest memory without a record; reconcile would find it by reading the guest, but the operator's audit trail would lose it), and even then the tmpfs row is above 100 µs: planning and verification read and check the guest's bytes outside the stop on every apply. Neither trade was made. Tried and kept: the vCPU thread ids cached between stops (a monitor round trip of about a millisecond per apply is gone).",
				tg.What, us(disk.Stats.Median), us(shm.Stats.Median), us(disk.Stats.Median-shm.Stats.Median), us(win.Stats.Median)))
		case strings.Contains(tg.What, "CPU hog"):
			r.Notes = append(r.Notes, fmt.Sprintf("Not met: %s (%s). With a hog on every core, a vCPU thread that is runnable but not running must wait for a CPU to reach its stop, and after the detach waits again to run; the freezing thread's SCHED_FIFO boost (rows with and without it) only shortens its own waits. Boosting the vCPU threads themselves would change QEMU's scheduling and outlive a crash of hvpatch; it was not done.", tg.What, tg.Detail))
		default:
			r.Notes = append(r.Notes, fmt.Sprintf("Not met: %s (%s); see the rows of the same run below.", tg.What, tg.Detail))
		}
	}
}

// TestReportNotes re-renders bench/REPORT.md from bench/REPORT.json with the
// notes of explainTargets (HVPATCH_BENCH_RENOTE=1): for a report measured
// before those notes existed.
func TestReportNotes(t *testing.T) {
	if os.Getenv("HVPATCH_BENCH_RENOTE") == "" {
		t.Skip("HVPATCH_BENCH_RENOTE not set")
	}
	b, err := os.ReadFile("REPORT.json")
	if err != nil {
		t.Fatal(err)
	}
	var r benchreport.Report
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	explainTargets(&r)
	writeReport(t, &r, ".")
}

// checkRows fails the test when a row is missing or measured nothing, so a
// broken measurement cannot produce a report that looks fine.
func checkRows(t *testing.T, r *benchreport.Report) {
	want := []string{"Freeze window, 1 vCPU", "Freeze window, 2 vCPU", "Guest-physical reads: 4 KiB random read",
		"Guest-physical reads: 1 MiB sequential read", "Guest-virtual reads through the page walker, 8 bytes", "Guest-virtual reads through the page walker, 4096 bytes", "Attach to ready", "hvpatch ps, end to end", "Return patch, apply + revert"}
	for _, name := range want {
		found := false
		for _, topic := range r.Topics {
			if topic.Name != name {
				continue
			}
			found = true
			for _, row := range topic.Rows {
				if row.Stats.N == 0 || row.Stats.Median <= 0 {
					t.Errorf("%s / %s: no samples", name, row.Name)
				}
				if row.Baseline != "" && row.Ratio == 0 {
					t.Errorf("%s / %s: no ratio against %s", name, row.Name, row.Baseline)
				}
			}
		}
		if !found {
			t.Errorf("report has no %q table", name)
		}
	}
}

func writeReport(t *testing.T, r *benchreport.Report, dir string) {
	md, err := os.Create(filepath.Join(dir, "REPORT.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer md.Close()
	if err := r.WriteMarkdown(md); err != nil {
		t.Fatal(err)
	}
	js, err := os.Create(filepath.Join(dir, "REPORT.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer js.Close()
	if err := r.WriteJSON(js); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	r.WriteMarkdown(&b)
	t.Logf("report written to %s (GOMAXPROCS %d):\n%s", dir, runtime.GOMAXPROCS(0), b.String())
}

// returnPatch applies and reverts the version-kill-switch patch through
// each code writer, timing the whole operation (plan, stop, verify, write,
// read back, resume) and the freeze window inside it.
func returnPatch(t *testing.T, ctx context.Context, r *benchreport.Report, g *guest) {
	patch, err := patcher.LoadPatch("../configs/patches/version-kill-switch.yaml")
	if err != nil {
		t.Fatal(err)
	}
	live, err := patcher.OpenLive(ctx, g.dom, "gdbstub")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	shm, err := os.MkdirTemp("/dev/shm", "hvpatch-bench-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(shm)
	whole := r.Topic("Return patch, apply + revert", "one apply or one revert of version-kill-switch (return 0 from version_proc_show): plan, stop, re-verify, write, read back, resume")
	windows := r.Topic("Return patch, freeze window", "how long the vCPUs were stopped inside one apply or revert")
	for _, row := range []struct{ kind, name, state string }{
		{"gdbstub", "gdbstub", t.TempDir()},
		{"direct+ptrace", "direct+ptrace", t.TempDir()},
		{"direct+ptrace", "direct+ptrace, journal on tmpfs", shm},
		{"direct+suspend", "direct+suspend", t.TempDir()},
	} {
		kind := row.kind
		pt := &patcher.Patcher{State: patcher.StateDir{Dir: row.state}}
		waitRunning(t, ctx, g.dom)
		d, err := live.WithWriter(ctx, kind)
		if err != nil {
			t.Fatal(err)
		}
		var total, frozen []time.Duration
		for i := 0; i < runs(50, 3); i++ {
			t0 := time.Now()
			res, err := pt.Apply(ctx, d, patch, patcher.ApplyOptions{})
			if err != nil {
				t.Fatalf("%s apply: %v", kind, err)
			}
			total = append(total, time.Since(t0))
			frozen = append(frozen, res.Freeze.Window)
			t0 = time.Now()
			res, err = pt.Revert(ctx, d, patch.ID)
			if err != nil {
				t.Fatalf("%s revert: %v", kind, err)
			}
			total = append(total, time.Since(t0))
			frozen = append(frozen, res.Freeze.Window)
		}
		base := "direct+suspend"
		if kind == base {
			base = ""
		}
		note := ""
		if kind != "gdbstub" && g.g.Accel == "tcg" {
			note = "KVM path; under TCG the guest keeps running translated code"
		}
		if row.name != kind {
			note = strings.TrimPrefix(note+"; journal fsyncs on tmpfs cost nothing: what the apply costs besides them", "; ")
		}
		whole.Add(row.name, total, base, note)
		windows.Add(row.name, frozen, base, note)
	}
}
