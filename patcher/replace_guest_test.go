package patcher

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
	"github.com/hvpatch/hvpatch/linker"
)

// Objects a replace edit must refuse, each with what the error must name.
var badReplaceSources = map[string]struct{ src, want string }{
	"unresolved": {`
extern int hvpatch_no_such_kernel_function(int);
int bad_entry(void *m, void *v) { return hvpatch_no_such_kernel_function(1); }
`, "hvpatch_no_such_kernel_function"},
	// Thread-local storage needs R_X86_64_TPOFF32, which is not supported.
	"reloc": {`
__thread int hvpatch_tls;
int bad_entry(void *m, void *v) { return hvpatch_tls; }
`, "TLS|TPOFF|tbss"},
	// 1 MiB of initialised data: more than the whole code area.
	"toolarge": {`
char hvpatch_big[1 << 20] = {1};
int bad_entry(void *m, void *v) { return hvpatch_big[(long)v]; }
`, "area too small"},
}

const replaceMarker = "(version_proc_show replaced by hvpatch)"

// buildReplaceObjects compiles the example replacement and the bad objects
// for the guest's kernel config; it returns the output directory.
func buildReplaceObjects(t *testing.T, k testguest.Kernel) string {
	t.Helper()
	srcs := map[string]string{}
	for name, b := range badReplaceSources {
		srcs[name] = b.src
	}
	srcs["multi"] = multiReplaceSource
	return testkernel.BuildReplacements(t, k, srcs)
}

// memHash hashes the kernel text and the first MiB of guest RAM (where the
// code area lives).
func (lg *liveGuest) memHash(t *testing.T) string {
	t.Helper()
	low := make([]byte, 1<<20)
	if err := lg.live.Kernel.Mem.ReadPhys(0, low); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(low)
	return lg.textHash(t) + "/" + hex.EncodeToString(sum[:])
}

func replacePatch(obj, with string) *Patch {
	return &Patch{ID: "replace-test", Match: Match{Release: StringList{"*"}},
		Edits: []Edit{{Kind: KindReplace, Function: "version_proc_show", Object: obj, With: with}}}
}

// TestGuestReplace runs function replacement end to end on both kernels.
func TestGuestReplace(t *testing.T) {
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
	only := os.Getenv("HVPATCH_TEST_SERIES")
	for _, k := range ks {
		if only != "" && k.Series != only {
			continue
		}
		t.Run(k.Series, func(t *testing.T) {
			lg := startLive(t, k)
			objs := buildReplaceObjects(t, k)
			if lg.live.Writer.Name() != "gdbstub" {
				t.Fatalf("writer %s: the release reads registers through the monitor, safe with the gdbstub", lg.live.Writer.Name())
			}
			t.Run("Refusals", func(t *testing.T) { lg.testReplaceRefusals(t, objs) })
			t.Run("ApplyRevert", func(t *testing.T) { lg.testReplaceApplyRevert(t, objs) })
			t.Run("TwoEditsOneObject", func(t *testing.T) { lg.testReplaceTwoEdits(t, objs) })
			if t.Failed() {
				return
			}
			t.Run("Cycles", func(t *testing.T) { lg.testReplaceCycles(t, objs) })
			if err := lg.g.ConsoleError(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func (lg *liveGuest) testReplaceRefusals(t *testing.T, objs string) {
	ctx := context.Background()
	before := lg.memHash(t)
	for name, b := range badReplaceSources {
		p := replacePatch(filepath.Join(objs, name+".o"), "bad_entry")
		_, perr := MakePlan(lg.live.Target, p, PlanOptions{})
		_, aerr := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
		for _, err := range []error{perr, aerr} {
			if err == nil || !containsAny(err.Error(), strings.Split(b.want, "|")) {
				t.Errorf("%s: error %v, want one naming %q", name, err, b.want)
			}
		}
		var size *linker.SizeError
		if name == "toolarge" && !errors.As(perr, &size) {
			t.Errorf("toolarge: not a *linker.SizeError: %v", perr)
		}
		t.Logf("%s refused: %v", name, perr)
	}
	// A site another edit holds: the kill switch's return sequence.
	ks := loadExample(t, "version-kill-switch.yaml")
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, ks, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	taken := lg.memHash(t)
	_, err := lg.pt.Apply(ctx, lg.live.Domain, replacePatch(filepath.Join(objs, "version_proc_show.o"), "hvpatch_version_proc_show"), ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), "which patch version-kill-switch (applied, return edit) already patched") {
		t.Errorf("replace over the kill switch: %v", err)
	}
	t.Logf("site taken refused: %v", err)
	if lg.memHash(t) != taken {
		t.Error("guest memory changed by the refused replace over a taken site")
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, ks.ID); err != nil {
		t.Fatal(err)
	}
	if lg.memHash(t) != before {
		t.Error("kernel text or first MiB changed by refused objects")
	}
	if st, err := lg.pt.Reconcile(lg.live.Domain); err != nil || len(st.Patches) != 0 {
		t.Errorf("journal after refusals: %+v %v", st, err)
	}
}

// exampleReplace is configs/patches/version-replace.yaml with its object
// taken from the test's build.
func exampleReplace(t *testing.T, objs string) *Patch {
	p := loadExample(t, "version-replace.yaml")
	e := &p.Edits[0]
	if got := filepath.Clean(p.ObjectPath(e)); !strings.HasSuffix(got, filepath.Join("examples", "replace", "build", "version_proc_show.o")) {
		t.Fatalf("the example's object resolves to %s", got)
	}
	e.Object = filepath.Join(objs, "version_proc_show.o")
	return p
}

func (lg *liveGuest) testReplaceApplyRevert(t *testing.T, objs string) {
	ctx := context.Background()
	original := lg.g.MustRun("cat /proc/version")
	before := lg.memHash(t)
	p := exampleReplace(t, objs)

	pl, err := MakePlan(lg.live.Target, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := pl.Edits[0]
	lm := e.Replace.LinkMapText()
	for _, want := range []string{"hvpatch_version_proc_show", "seq_printf", "init_uts_ns"} {
		if !strings.Contains(lm, want) {
			t.Errorf("link map lacks %s:\n%s", want, lm)
		}
	}
	if len(e.Replace.LinkMap.Relocations) == 0 || len(e.After) != 1 || !strings.HasPrefix(strings.ToLower(e.After[0].Text), "jmp") {
		t.Errorf("plan: %d relocations, after %+v", len(e.Replace.LinkMap.Relocations), e.After)
	}
	t.Logf("plan: %s at %#x: % x -> % x (%s)\nlink map:\n%s", e.Symbol, e.VA, e.Old, e.New, e.After[0].Text, lm)
	if lg.memHash(t) != before {
		t.Fatal("planning changed guest memory")
	}

	t0 := time.Now()
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	got := lg.g.MustRun("cat /proc/version")
	if !strings.Contains(got, replaceMarker) || !strings.Contains(got, lg.g.Release) {
		t.Fatalf("/proc/version with the replacement: %q", got)
	}
	t.Logf("apply in %v (guest frozen %v, %s): /proc/version now %q", took.Round(time.Millisecond), res.Freeze.Window, res.Freeze.Method, got)

	j, err := lg.pt.State.Load(lg.live.Name, lg.live.UUID)
	if err != nil || len(j.Patches) != 1 || j.Patches[0].Edits[0].AreaEntry != "version-replace:version_proc_show.o" {
		t.Fatalf("journal: %+v %v", j, err)
	}
	st, err := lg.pt.Reconcile(lg.live.Domain)
	if err != nil || len(st.Patches) != 1 || st.Patches[0].Memory != MemApplied {
		t.Fatalf("status while applied: %+v %v", st, err)
	}
	area, err := codearea.Find(lg.live.Kernel)
	if err != nil || !area.Recovered || len(area.Entries()) != 1 || area.Entries()[0].Site != e.VA {
		t.Fatalf("code area while applied: %+v %v", area, err)
	}
	pmdEntry := area.PMDEntryGPA
	again, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil || !again.NoOp {
		t.Fatalf("second apply: %+v %v", again, err)
	}

	t0 = time.Now()
	rres, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	took = time.Since(t0)
	t.Logf("revert in %v (jump removed in a freeze of %v; release %v, %d retries): %s",
		took.Round(time.Millisecond), rres.Freeze.Window, rres.ReleaseTime.Round(time.Millisecond), rres.ReleaseWaits, rres.Message)
	if got := lg.g.MustRun("cat /proc/version"); got != original {
		t.Fatalf("/proc/version after revert: %q, want %q", got, original)
	}
	lg.checkAreaGone(t, pmdEntry)
	if lg.memHash(t) != before {
		t.Error("kernel text or first MiB differ from before the apply")
	}
	if st, err := lg.pt.Reconcile(lg.live.Domain); err != nil || len(st.Patches) != 0 {
		t.Errorf("journal after revert: %+v %v", st, err)
	}

	// The jump removed behind hvpatch's back: reconcile reports the code
	// left in the area, and a revert releases it.
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	_, gpa, err := lg.live.Target.Translate(e.VA)
	if err != nil {
		t.Fatal(err)
	}
	sg, err := lg.live.Writer.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	werr := sg.Write(e.VA, gpa, FentryNop)
	if _, err := sg.Resume(); err != nil || werr != nil {
		t.Fatal(err, werr)
	}
	st, err = lg.pt.Reconcile(lg.live.Domain)
	if err != nil || len(st.Patches) != 1 || !strings.Contains(st.Patches[0].Difference, "still holds version-replace:version_proc_show.o") {
		t.Fatalf("status with the jump gone and the code still placed: %+v %v", st, err)
	}
	t.Logf("reconcile: %s", st.Patches[0].Difference)
	rres, err = lg.pt.Revert(ctx, lg.live.Domain, p.ID)
	if err != nil || !strings.Contains(rres.Message, "already gone") {
		t.Fatalf("revert of the orphaned code: %+v %v", rres, err)
	}
	lg.checkAreaGone(t, pmdEntry)
	if lg.memHash(t) != before {
		t.Error("kernel text or first MiB differ after releasing the orphaned code")
	}
}

// checkAreaGone: no code-area header in the guest, the slot's PMD entry zero.
func (lg *liveGuest) checkAreaGone(t *testing.T, pmdEntry uint64) {
	t.Helper()
	area, err := codearea.Find(lg.live.Kernel)
	if err != nil || area.Recovered || len(area.Entries()) != 0 {
		t.Fatalf("code area after revert: recovered %v, entries %v, %v", area != nil && area.Recovered, area.Entries(), err)
	}
	var b [8]byte
	if err := lg.live.Kernel.Mem.ReadPhys(pmdEntry, b[:]); err != nil || binary.LittleEndian.Uint64(b[:]) != 0 {
		t.Fatalf("PMD entry at %#x after revert: % x %v", pmdEntry, b, err)
	}
}

func (lg *liveGuest) testReplaceCycles(t *testing.T, objs string) {
	ctx := context.Background()
	g := lg.g
	original := strings.TrimSpace(g.MustRun("cat /proc/version"))
	p := exampleReplace(t, objs)
	for cpu := 0; cpu < g.VCPUs; cpu++ {
		g.MustRun(fmt.Sprintf("(while :; do taskset -c %d /bin/readloop /proc/version 2; done) > /tmp/rr.%d 2>&1 & echo $! > /tmp/rr.%d.pid", cpu, cpu, cpu))
	}
	time.Sleep(2500 * time.Millisecond)
	cycles := 100
	if s := os.Getenv("HVPATCH_REPLACE_CYCLES"); s != "" {
		cycles, _ = strconv.Atoi(s)
	}
	var applyW, revertW, applyT, revertT []time.Duration
	waits := 0
	pmdEntry := uint64(0)
	patched := ""
	for i := 0; i < cycles; i++ {
		t0 := time.Now()
		res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
		if err != nil || res.NoOp {
			t.Fatalf("cycle %d apply: %v %+v", i, err, res)
		}
		applyT, applyW = append(applyT, time.Since(t0)), append(applyW, res.Freeze.Window)
		if i == 0 {
			patched = strings.TrimSpace(g.MustRun("cat /proc/version"))
			a, err := codearea.Find(lg.live.Kernel)
			if err != nil {
				t.Fatal(err)
			}
			pmdEntry = a.PMDEntryGPA
		}
		time.Sleep(20 * time.Millisecond) // the readers call the replacement
		t0 = time.Now()
		rres, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID)
		if err != nil {
			t.Fatalf("cycle %d revert: %v", i, err)
		}
		revertT, revertW = append(revertT, time.Since(t0)), append(revertW, rres.Freeze.Window)
		waits += rres.ReleaseWaits
		time.Sleep(20 * time.Millisecond)
	}
	g.MustRun("kill $(cat /tmp/rr.*.pid); sleep 2.5")
	if !strings.Contains(patched, replaceMarker) {
		t.Fatalf("/proc/version while replaced: %q", patched)
	}
	line := func(s string) string { return s[:min(60, len(s))] } // readloop prints 60 characters
	counts := map[string]int{}
	for cpu := 0; cpu < g.VCPUs; cpu++ {
		for _, l := range strings.Split(g.MustRun(fmt.Sprintf("cat /tmp/rr.%d", cpu)), "\n") {
			if l == "" {
				continue
			}
			n, text, ok := strings.Cut(l, "\t")
			c, err := strconv.Atoi(n)
			if !ok || err != nil {
				t.Fatalf("readloop output line %q", l)
			}
			switch text {
			case line(original):
				counts["original"] += c
			case line(patched):
				counts["replaced"] += c
			default:
				t.Errorf("a reader saw %q", text)
			}
		}
	}
	t.Logf("%d cycles under readloop on %d vCPUs; readers saw %v; releases retried %d times while in use", cycles, g.VCPUs, counts, waits)
	t.Logf("apply: %s; freeze %s", stats(applyT), stats(applyW))
	t.Logf("revert: %s; jump-removal freeze %s", stats(revertT), stats(revertW))
	if counts["original"] == 0 || counts["replaced"] == 0 {
		t.Errorf("readers should have seen both lines: %v", counts)
	}
	if got := strings.TrimSpace(g.MustRun("cat /proc/version")); got != original {
		t.Fatalf("/proc/version after the cycles: %q", got)
	}
	lg.checkAreaGone(t, pmdEntry)
	if err := g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
