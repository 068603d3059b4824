package patcher

import (
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
)

// liveGuest is a booted test guest opened for patching.
type liveGuest struct {
	g    *testguest.Guest
	live *Live
	pt   *Patcher
}

func startLive(t *testing.T, k testguest.Kernel) *liveGuest {
	t.Helper()
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
	ctx := context.Background()
	hv := testkernel.Domain(t, g)
	live, err := OpenLive(ctx, hv, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { live.Close() })
	t.Logf("%s (%s): kernel found in %v, writer %s", g.Name, k.Release, live.Kernel.AttachTime, live.Writer.Name())
	return &liveGuest{g: g, live: live, pt: &Patcher{State: StateDir{Dir: t.TempDir()}}}
}

// textHash hashes the guest's whole kernel text, to show that a refused
// operation changed nothing.
func (lg *liveGuest) textHash(t *testing.T) string {
	t.Helper()
	start, err1 := uniqueSymbol(lg.live.Target, "_stext")
	end, err2 := uniqueSymbol(lg.live.Target, "_etext")
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, end.Addr-start.Addr)
	if err := lg.live.Target.ReadVirt(start.Addr, buf); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(buf)
	return hex.EncodeToString(sum[:])
}

func vmlinuxBuildID(t *testing.T, k testguest.Kernel) string {
	t.Helper()
	f, err := elf.Open(k.Vmlinux())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := f.Section(".notes")
	if s == nil {
		t.Fatalf("%s has no .notes section", k.Vmlinux())
	}
	b, err := s.Data()
	if err != nil {
		t.Fatal(err)
	}
	id, err := ParseBuildIDNote(b)
	if err != nil || id == nil {
		t.Fatalf("%s: build id %v %v", k.Vmlinux(), id, err)
	}
	return hex.EncodeToString(id)
}

func loadExample(t *testing.T, name string) *Patch {
	t.Helper()
	p, err := LoadPatch(filepath.Join("..", "configs", "patches", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestGuestPatching runs every guest check on both kernels, one guest each.
func TestGuestPatching(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	ks, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 2 {
		t.Fatalf("want the 6.1 and 6.12 kernels, have %v", ks)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) {
			lg := startLive(t, k)
			t.Run("BuildID", func(t *testing.T) { lg.testBuildID(t, k) })
			t.Run("ReturnPatch", lg.testReturnPatch)
			t.Run("BytesPatch", lg.testBytesPatch)
			t.Run("Refusals", lg.testRefusals)
			t.Run("RIPChecked", lg.testRIPChecked)
			t.Run("DirectWriterPtrace", lg.testDirectPtrace)
			t.Run("CrashRecovery", lg.testCrashRecovery)
			t.Run("Load", lg.testLoad)
			t.Run("Reboot", lg.testReboot)
			if err := lg.g.ConsoleError(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func (lg *liveGuest) testBuildID(t *testing.T, k testguest.Kernel) {
	id, err := BuildID(lg.live.Target)
	if err != nil {
		t.Fatal(err)
	}
	if want := vmlinuxBuildID(t, k); id != want {
		t.Fatalf("build id from guest memory %s, vmlinux %s", id, want)
	}
}

func (lg *liveGuest) testReturnPatch(t *testing.T) {
	ctx := context.Background()
	want := lg.g.MustRun("cat /proc/version")
	if !strings.HasPrefix(want, "Linux version "+lg.g.Release) {
		t.Fatalf("/proc/version before: %q", want)
	}
	p := loadExample(t, "version-kill-switch.yaml")
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("apply: %s", res.Message)
	if got := lg.g.MustRun("cat /proc/version"); got != "" {
		t.Fatalf("/proc/version with the kill switch: %q, want it empty", got)
	}
	res2, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil || !res2.NoOp || !strings.Contains(res2.Message, "already applied") {
		t.Fatalf("second apply: %+v %v", res2, err)
	}
	st, err := lg.pt.Reconcile(lg.live.Domain)
	if err != nil || len(st.Patches) != 1 || st.Patches[0].Memory != MemApplied {
		t.Fatalf("status while applied: %+v %v", st, err)
	}
	rres, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("revert: %s", rres.Message)
	if got := lg.g.MustRun("cat /proc/version"); got != want {
		t.Fatalf("/proc/version after revert: %q, want %q", got, want)
	}
	if res.Freeze.Window <= 0 || rres.Freeze.Window <= 0 {
		t.Fatalf("freeze windows %v %v", res.Freeze, rres.Freeze)
	}
}

// findInstruction locates an instruction in a function by its text.
func (lg *liveGuest) findInstruction(t *testing.T, fn, text string) (uint64, []byte) {
	t.Helper()
	sym, err := uniqueSymbol(lg.live.Target, fn)
	if err != nil {
		t.Fatal(err)
	}
	code := make([]byte, sym.Size)
	if err := lg.live.Target.ReadVirt(sym.Addr, code); err != nil {
		t.Fatal(err)
	}
	insts, _ := disassemble(code, sym.Addr)
	for _, in := range insts {
		if in.Text == text {
			return in.Addr - sym.Addr, in.Bytes
		}
	}
	t.Fatalf("no %q in %s: %v", text, fn, insts)
	return 0, nil
}

// A bytes edit of one whole instruction: cmdline_proc_show's newline
// becomes '!'.
func (lg *liveGuest) testBytesPatch(t *testing.T) {
	ctx := context.Background()
	off, old := lg.findInstruction(t, "cmdline_proc_show", "mov $0xa,%esi")
	replace := append([]byte(nil), old...)
	replace[1] = '!'
	p := bytesPatch("cmdline_proc_show", off, old, replace)
	p.ID = "cmdline-bang"
	p.Match = Match{Release: StringList{lg.g.Release}}
	before := lg.g.MustRun("cat /proc/cmdline")
	if !strings.HasSuffix(before, "\n") {
		t.Fatalf("/proc/cmdline %q", before)
	}
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := lg.g.MustRun("cat /proc/cmdline; echo"); got != strings.TrimSuffix(before, "\n")+"!\n" {
		t.Fatalf("/proc/cmdline patched: %q", got)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if got := lg.g.MustRun("cat /proc/cmdline"); got != before {
		t.Fatalf("/proc/cmdline after revert: %q", got)
	}
}

// An edit over two instructions (the whole "mov %rbx,%rdi" and the first
// two bytes of "mov $0xa,%esi") goes in only in the RIP-checked mode, with
// every vCPU's RIP read through the monitor while the gdbstub holds the VM.
func (lg *liveGuest) testRIPChecked(t *testing.T) {
	ctx := context.Background()
	off, old := lg.findInstruction(t, "cmdline_proc_show", "mov $0xa,%esi")
	sym, _ := uniqueSymbol(lg.live.Target, "cmdline_proc_show")
	code := make([]byte, off)
	if err := lg.live.Target.ReadVirt(sym.Addr, code); err != nil {
		t.Fatal(err)
	}
	insts, err := disassemble(code, sym.Addr)
	if err != nil || len(insts) == 0 {
		t.Fatalf("decoding cmdline_proc_show: %v", err)
	}
	prev := insts[len(insts)-1]
	expect := append(append([]byte(nil), prev.Bytes...), old[:2]...)
	replace := append(append([]byte(nil), prev.Bytes...), old[0], '!')
	p := bytesPatch("cmdline_proc_show", prev.Addr-sym.Addr, expect, replace)
	p.ID = "cmdline-bang-rip"
	before := lg.g.MustRun("cat /proc/cmdline")
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "RIP-checked") {
		t.Fatalf("without the mode: %v", err)
	}
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{PlanOptions: PlanOptions{RIPChecked: true}})
	if err != nil {
		t.Fatal(err)
	}
	if e := res.Plan.Edits[0]; !e.RIPCheck || e.CheckStart != prev.Addr || e.CheckEnd != sym.Addr+off+uint64(len(old)) {
		t.Fatalf("planned %+v", e)
	}
	if got := lg.g.MustRun("cat /proc/cmdline; echo"); got != strings.TrimSuffix(before, "\n")+"!\n" {
		t.Fatalf("/proc/cmdline patched: %q", got)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if got := lg.g.MustRun("cat /proc/cmdline"); got != before {
		t.Fatalf("/proc/cmdline after revert: %q", got)
	}
	// Through libvirt suspend the monitor reads the RIPs too. The guest does
	// not run cmdline_proc_show until the gdbstub has rewritten the same
	// bytes, so TCG cannot keep a stale translation of the direct write.
	sus, err := lg.live.WithWriter(ctx, "direct+suspend")
	if err != nil {
		t.Fatal(err)
	}
	_, err = lg.pt.Apply(ctx, sus, p, ApplyOptions{PlanOptions: PlanOptions{RIPChecked: true}})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(replace))
	if err := lg.live.Target.ReadVirt(prev.Addr, got); err != nil || string(got) != string(replace) {
		t.Fatalf("memory after a direct+suspend apply: % x (%v)", got, err)
	}
	if _, err := lg.pt.Revert(ctx, sus, p.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{PlanOptions: PlanOptions{RIPChecked: true}}); err != nil {
		t.Fatal(err)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if got := lg.g.MustRun("cat /proc/cmdline"); got != before {
		t.Fatalf("/proc/cmdline after the suspend cycle: %q", got)
	}
	// A ptrace freeze must not call the monitor, so it cannot take this mode.
	d, err := lg.live.WithWriter(ctx, "direct+ptrace")
	if err != nil {
		t.Fatal(err)
	}
	hash := lg.textHash(t)
	if _, err := lg.pt.Apply(ctx, d, p, ApplyOptions{PlanOptions: PlanOptions{RIPChecked: true}}); err == nil || !strings.Contains(err.Error(), "cannot read vCPU registers") {
		t.Fatalf("RIP-checked through a ptrace freeze: %v", err)
	}
	if lg.textHash(t) != hash {
		t.Fatal("kernel text changed")
	}
}

// gateWriter holds Stop until released, to keep an operation in progress.
type gateWriter struct {
	CodeWriter
	entered chan struct{}
	release chan struct{}
}

func (g *gateWriter) Stop(ctx context.Context) (StoppedGuest, error) {
	close(g.entered)
	<-g.release
	return g.CodeWriter.Stop(ctx)
}

func (lg *liveGuest) testRefusals(t *testing.T) {
	ctx := context.Background()
	d := lg.live.Domain
	off, old := lg.findInstruction(t, "cmdline_proc_show", "mov $0xa,%esi")
	wrong := append([]byte(nil), old...)
	wrong[1] ^= 0xff
	bad := append([]byte(nil), old...)
	bad[1] = '!'
	// The last byte of the previous instruction and the first two of this one.
	sym, _ := uniqueSymbol(d.Target, "cmdline_proc_show")
	prev := make([]byte, 1)
	if err := d.Target.ReadVirt(sym.Addr+off-1, prev); err != nil {
		t.Fatal(err)
	}
	cross := bytesPatch("cmdline_proc_show", off-1, append(prev, old[:2]...), append([]byte{0x90}, old[:2]...))
	cases := []struct {
		name string
		p    *Patch
		want string
	}{
		{"wrong expected bytes", bytesPatch("cmdline_proc_show", off, wrong, bad), "expected " + FormatHex(wrong) + ", found " + FormatHex(old)},
		{"release", &Patch{ID: "old-kernel", Match: Match{Release: StringList{"5.10.*"}}, Edits: returnPatch("version_proc_show", 0).Edits}, "the guest runs " + lg.g.Release},
		{"build id", &Patch{ID: "other-build", Match: Match{BuildIDs: StringList{"0123456789abcdef"}}, Edits: returnPatch("version_proc_show", 0).Edits}, "0123456789abcdef"},
		{"unknown symbol", returnPatch("hvpatch_no_such_function", 0), "unknown symbol hvpatch_no_such_function"},
		{"across an instruction boundary", cross, "does not replace exactly one whole instruction"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := lg.textHash(t)
			_, err := lg.pt.Apply(ctx, d, c.p, ApplyOptions{})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want %q", err, c.want)
			}
			t.Logf("refused: %v", err)
			if after := lg.textHash(t); after != before {
				t.Fatal("kernel text changed")
			}
		})
	}

	t.Run("ftrace site", func(t *testing.T) {
		tr := "/sys/kernel/tracing"
		lg.g.MustRun(fmt.Sprintf("echo version_proc_show > %s/set_ftrace_filter && echo function > %s/current_tracer", tr, tr))
		defer lg.g.MustRun(fmt.Sprintf("echo nop > %s/current_tracer && echo > %s/set_ftrace_filter", tr, tr))
		before := lg.textHash(t)
		_, err := lg.pt.Apply(ctx, d, loadExample(t, "version-kill-switch.yaml"), ApplyOptions{})
		if err == nil || !strings.Contains(err.Error(), "taken by ftrace") {
			t.Fatalf("error %v, want the site taken by ftrace", err)
		}
		t.Logf("refused: %v", err)
		if after := lg.textHash(t); after != before {
			t.Fatal("kernel text changed")
		}
		if out := lg.g.MustRun("cat /proc/version"); !strings.HasPrefix(out, "Linux version") {
			t.Fatalf("/proc/version under tracing: %q", out)
		}
	})

	t.Run("concurrent apply", func(t *testing.T) {
		gw := &gateWriter{CodeWriter: d.Writer, entered: make(chan struct{}), release: make(chan struct{})}
		held := d
		held.Writer = gw
		var wg sync.WaitGroup
		var firstErr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, firstErr = lg.pt.Apply(ctx, held, loadExample(t, "version-kill-switch.yaml"), ApplyOptions{})
		}()
		<-gw.entered
		before := lg.textHash(t)
		_, err := lg.pt.Apply(ctx, d, bytesPatch("cmdline_proc_show", off, old, bad), ApplyOptions{})
		if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "another patch operation is in progress on domain "+d.Name) {
			t.Fatalf("second apply: %v", err)
		}
		after := lg.textHash(t)
		close(gw.release)
		wg.Wait()
		if before != after {
			t.Fatal("kernel text changed")
		}
		if firstErr != nil {
			t.Fatal(firstErr)
		}
		if _, err := lg.pt.Revert(ctx, d, "version-kill-switch"); err != nil {
			t.Fatal(err)
		}
	})
}

// The KVM path on a TCG guest: a ptrace freeze and direct writes to guest
// RAM. TCG may keep running code it had translated, so the test checks
// memory by read-back and that the guest stays healthy, then passes a
// gdbstub write over the same bytes so TCG drops any stale translation.
func (lg *liveGuest) testDirectPtrace(t *testing.T) {
	ctx := context.Background()
	d, err := lg.live.WithWriter(ctx, "direct+ptrace")
	if err != nil {
		t.Fatal(err)
	}
	p := loadExample(t, "version-kill-switch.yaml")
	res, err := lg.pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := res.Plan.Edits[0]
	got := make([]byte, len(e.New))
	if err := lg.live.Target.ReadVirt(e.VA, got); err != nil || string(got) != string(e.New) {
		t.Fatalf("guest memory at %#x after a direct apply: % x (%v), want % x", e.VA, got, err, e.New)
	}
	if res.Freeze.Method != "ptrace" || res.Freeze.VCPUs != 2 {
		t.Fatalf("freeze %+v", res.Freeze)
	}
	rres, err := lg.pt.Revert(ctx, d, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := lg.live.Target.ReadVirt(e.VA, got); err != nil || string(got) != string(FentryNop) {
		t.Fatalf("guest memory at %#x after a direct revert: % x (%v)", e.VA, got, err)
	}
	t.Logf("ptrace freeze windows: apply %v, revert %v", res.Freeze.Window, rres.Freeze.Window)
	if out := lg.g.MustRun("echo alive; uname -r"); out != "alive\n"+lg.g.Release+"\n" {
		t.Fatalf("guest after direct writes: %q", out)
	}
	// Resynchronise TCG through the gdbstub, and check the guest runs the
	// original code.
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if out := lg.g.MustRun("cat /proc/version"); !strings.HasPrefix(out, "Linux version") {
		t.Fatalf("/proc/version: %q", out)
	}
	if err := lg.g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}

// loadCycles is the number of apply/revert cycles under load.
const loadCycles = 200

// testLoad: readers of /proc/version on every vCPU while 200 apply/revert
// cycles run through the default writer. Shorter runs through the libvirt
// suspend/resume freezer and the ptrace freezer (both with direct writes)
// come first for comparison; the default writer's run comes last so that,
// on TCG, the gdbstub leaves no stale translation of direct writes behind.
func (lg *liveGuest) testLoad(t *testing.T) {
	ctx := context.Background()
	g := lg.g
	want := strings.TrimSpace(g.MustRun("cat /proc/version"))
	wantLine := want[:min(60, len(want))] // readloop prints 60 characters
	// Readers: rounds of readloop, one loop per vCPU, pinned when taskset exists.
	pinned := false
	if _, err := g.Run("command -v taskset"); err == nil {
		pinned = true
	}
	for cpu := 0; cpu < g.VCPUs; cpu++ {
		pin := ""
		if pinned {
			pin = fmt.Sprintf("taskset -c %d ", cpu)
		}
		g.MustRun(fmt.Sprintf("(while :; do %s/bin/readloop /proc/version 2; done) > /tmp/rl.%d 2>&1 & echo $! > /tmp/rl.%d.pid", pin, cpu, cpu))
	}
	t.Logf("%d readers running (pinned to a vCPU each: %v)", g.VCPUs, pinned)
	time.Sleep(2500 * time.Millisecond) // every reader has finished a round
	p := loadExample(t, "version-kill-switch.yaml")
	run := func(d Domain, n int) ([]time.Duration, time.Duration) {
		t0 := time.Now()
		var windows []time.Duration
		for i := 0; i < n; i++ {
			res, err := lg.pt.Apply(ctx, d, p, ApplyOptions{})
			if err != nil {
				t.Fatalf("%s cycle %d apply: %v", d.Writer.Name(), i, err)
			}
			if res.NoOp {
				t.Fatalf("%s cycle %d apply was a no-op: %s", d.Writer.Name(), i, res.Message)
			}
			rres, err := lg.pt.Revert(ctx, d, p.ID)
			if err != nil {
				t.Fatalf("%s cycle %d revert: %v", d.Writer.Name(), i, err)
			}
			windows = append(windows, res.Freeze.Window, rres.Freeze.Window)
			time.Sleep(2 * time.Millisecond) // let the readers see each state
		}
		return windows, time.Since(t0)
	}
	var report strings.Builder
	for _, kind := range []string{"direct+ptrace", "direct+suspend"} {
		d, err := lg.live.WithWriter(ctx, kind)
		if err != nil {
			t.Fatal(err)
		}
		ws, took := run(d, loadCycles/4)
		fmt.Fprintf(&report, "%s under load, %d cycles with %s: %v, freeze windows %s\n", g.Release, loadCycles/4, kind, took.Round(time.Millisecond), stats(ws))
	}
	ws, took := run(lg.live.Domain, loadCycles)
	fmt.Fprintf(&report, "%s under load, %d cycles with %s: %v, freeze windows %s\n", g.Release, loadCycles, lg.live.Writer.Name(), took.Round(time.Millisecond), stats(ws))
	// Stop the readers and collect what they saw.
	g.MustRun("kill $(cat /tmp/rl.*.pid); sleep 2.5")
	counts := map[string]int{}
	for cpu := 0; cpu < g.VCPUs; cpu++ {
		out := g.MustRun(fmt.Sprintf("cat /tmp/rl.%d", cpu))
		for _, line := range strings.Split(out, "\n") {
			if line == "" {
				continue
			}
			n, text, ok := strings.Cut(line, "\t")
			c, err := strconv.Atoi(n)
			if !ok || err != nil {
				t.Fatalf("readloop output line %q", line)
			}
			counts[text] += c
		}
	}
	t.Logf("readers saw: %v", counts)
	if counts[wantLine] == 0 || counts[""] == 0 {
		t.Fatalf("readers should have seen both the version line and the empty patched output: %v", counts)
	}
	for text := range counts {
		if text != "" && text != wantLine {
			t.Fatalf("readers saw unexpected output %q", text)
		}
	}
	// Final state: unpatched, in memory and from inside.
	st, err := lg.pt.Reconcile(lg.live.Domain)
	if err != nil || len(st.Patches) != 0 {
		t.Fatalf("journal after the cycles: %+v %v", st, err)
	}
	sym, _ := uniqueSymbol(lg.live.Target, "version_proc_show")
	head := make([]byte, 9)
	if err := lg.live.Target.ReadVirt(sym.Addr, head); err != nil || !strings.Contains(string(head), string(FentryNop)) {
		t.Fatalf("version_proc_show starts % x after the cycles (%v)", head, err)
	}
	if got := strings.TrimSpace(g.MustRun("cat /proc/version")); got != want {
		t.Fatalf("/proc/version after the cycles: %q", got)
	}
	if err := g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + report.String())
	if dir := os.Getenv("HVPATCH_REPORT_DIR"); dir != "" {
		os.WriteFile(filepath.Join(dir, "patcher-load-"+g.Kernel.Series+".txt"), []byte(report.String()), 0o644)
	}
}

// A crash between writing the guest and journaling "applied" leaves a
// pending entry; reconcile reads the guest, records the patch as applied,
// and it can be reverted. A pending entry whose bytes never reached the
// guest is dropped.
func (lg *liveGuest) testCrashRecovery(t *testing.T) {
	ctx := context.Background()
	d := lg.live.Domain
	p := loadExample(t, "version-kill-switch.yaml")
	pl, err := MakePlan(d.Target, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	j, err := lg.pt.State.Load(d.Name, d.UUID)
	if err != nil {
		t.Fatal(err)
	}
	j.put(lg.pt.entry(pl, StatePending, d.Writer.Name(), 0))
	if err := lg.pt.State.Save(j); err != nil {
		t.Fatal(err)
	}
	// The crashed apply's write, done by hand.
	if _, err := writeUnderFreeze(ctx, d, pl, false); err != nil {
		t.Fatal(err)
	}
	st, err := lg.pt.Reconcile(d)
	if err != nil || len(st.Patches) != 1 || st.Patches[0].Memory != MemApplied || !strings.Contains(st.Patches[0].Difference, "recorded as applied") {
		t.Fatalf("reconcile after a crash past the write: %+v %v", st, err)
	}
	if got := lg.g.MustRun("cat /proc/version"); got != "" {
		t.Fatalf("/proc/version: %q", got)
	}
	if _, err := lg.pt.Revert(ctx, d, p.ID); err != nil {
		t.Fatal(err)
	}
	// A crash before the write.
	j, _ = lg.pt.State.Load(d.Name, d.UUID)
	j.put(lg.pt.entry(pl, StatePending, d.Writer.Name(), 0))
	lg.pt.State.Save(j)
	st, err = lg.pt.Reconcile(d)
	if err != nil || len(st.Patches) != 1 || st.Patches[0].Memory != MemNotApplied {
		t.Fatalf("reconcile after a crash before the write: %+v %v", st, err)
	}
	if j, _ := lg.pt.State.Load(d.Name, d.UUID); len(j.Patches) != 0 {
		t.Fatalf("journal keeps %+v", j.Patches)
	}
	if got := lg.g.MustRun("cat /proc/version"); !strings.HasPrefix(got, "Linux version") {
		t.Fatalf("/proc/version: %q", got)
	}
}

// After a reboot with a patch applied, reconcile reports the patch gone and
// drops it from the journal; a revert says why there is nothing to revert.
func (lg *liveGuest) testReboot(t *testing.T) {
	ctx := context.Background()
	p := loadExample(t, "version-kill-switch.yaml")
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	ready := func() int { return strings.Count(lg.g.Console(), "HVPATCH-READY") }
	boots := ready()
	// The shell does not answer once the kernel restarts; it is not used again.
	lg.g.RunTimeout("echo b > /proc/sysrq-trigger", 2*time.Second)
	deadline := time.Now().Add(90 * time.Second)
	for ready() == boots {
		if time.Now().After(deadline) {
			t.Fatalf("guest did not come back after the reboot:\n%s", lg.g.Console())
		}
		time.Sleep(100 * time.Millisecond)
	}
	live, err := OpenLive(ctx, lg.live.HV, "")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	st, err := lg.pt.Reconcile(live.Domain)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Patches) != 1 || st.Patches[0].Memory != MemRebooted || !strings.Contains(st.Patches[0].Difference, "rebooted") {
		t.Fatalf("status after reboot: %+v", st)
	}
	t.Logf("after reboot: %s: %s", st.Patches[0].Entry.ID, st.Patches[0].Difference)
	if j, _ := lg.pt.State.Load(live.Name, live.UUID); len(j.Patches) != 0 {
		t.Fatalf("journal after reconcile: %+v", j.Patches)
	}
	sym, _ := uniqueSymbol(live.Target, "version_proc_show")
	head := make([]byte, 9)
	if err := live.Target.ReadVirt(sym.Addr, head); err != nil || !strings.Contains(string(head), string(FentryNop)) {
		t.Fatalf("version_proc_show after the reboot starts % x (%v)", head, err)
	}
}

func stats(ws []time.Duration) string {
	s := append([]time.Duration(nil), ws...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	pct := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return fmt.Sprintf("n=%d min %v median %v p90 %v p99 %v max %v", len(s), s[0], pct(0.5), pct(0.9), pct(0.99), s[len(s)-1])
}
