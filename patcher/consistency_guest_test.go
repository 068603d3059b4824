package patcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
)

// pipeReadTrampoline is a "replacement" of pipe_read that runs the
// original body: it jumps to pipe_read past its fentry site (+5, or +9
// after endbr64 on IBT kernels), so the guest's pipes keep working while
// it is applied. The test is about when the switch may happen, not about
// what the new code does.
func pipeReadTrampoline(siteEnd uint64) string {
	return fmt.Sprintf(`
asm(".text\n"
    ".globl hvpatch_pipe_read\n"
    ".type hvpatch_pipe_read, @function\n"
    "hvpatch_pipe_read:\n"
    "\tjmp pipe_read+%d\n"
    ".size hvpatch_pipe_read, .-hvpatch_pipe_read\n");
`, siteEnd)
}

// TestGuestConsistency: the activeness check and cumulative patches on
// both kernels (HVPATCH_TEST_SERIES picks one).
func TestGuestConsistency(t *testing.T) {
	testguest.Need(t)
	ks, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	only := os.Getenv("HVPATCH_TEST_SERIES")
	for _, k := range ks {
		if only != "" && k.Series != only {
			continue
		}
		t.Run(k.Series, func(t *testing.T) {
			lg := startLive(t, k)
			sym, err := editSymbol(lg.live.Target, "pipe_read", 0)
			if err != nil {
				t.Fatal(err)
			}
			head := make([]byte, 4)
			if err := lg.live.Target.ReadVirt(sym.Addr, head); err != nil {
				t.Fatal(err)
			}
			siteEnd := uint64(SiteLen)
			if bytes.Equal(head, Endbr64) {
				siteEnd += uint64(len(Endbr64))
			}
			objs := testkernel.BuildReplacements(t, k, map[string]string{
				"pipetramp": pipeReadTrampoline(siteEnd),
				"multi":     multiReplaceSource,
			})
			t.Run("BlockedReader", func(t *testing.T) { lg.testBlockedReader(t, objs) })
			t.Run("Supersede", func(t *testing.T) { lg.testSupersede(t, objs) })
			if err := lg.g.ConsoleError(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// whileShellBusy runs f while the guest's command shell runs a sleep of
// secs seconds. The test harness's shell reads its commands from a pipe,
// so between commands it sleeps in pipe_read itself (the activeness check
// names it, "sh"); while it runs a command it waits in do_wait instead.
func (lg *liveGuest) whileShellBusy(t *testing.T, secs int, f func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := lg.g.RunTimeout(fmt.Sprintf("sleep %d", secs), time.Duration(secs+30)*time.Second)
		done <- err
	}()
	time.Sleep(700 * time.Millisecond) // the shell has read the command
	f()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func pipeReadPatch(objs string) *Patch {
	return &Patch{ID: "pipe-read-stack", Match: Match{Release: StringList{"*"}}, Consistency: ConsistencyStack,
		Edits: []Edit{{Kind: KindReplace, Function: "pipe_read", Object: filepath.Join(objs, "pipetramp.o"), With: "hvpatch_pipe_read"}}}
}

// A reader sleeping in pipe_read: the apply is retried, then refused naming
// it, guest memory unchanged; once it is gone the apply succeeds, pipes
// still work, and the revert empties the code area.
func (lg *liveGuest) testBlockedReader(t *testing.T, objs string) {
	ctx := context.Background()
	g := lg.g
	before := lg.memHash(t)
	p := pipeReadPatch(objs)
	t.Logf("processes before: %q", g.MustRun("for p in /proc/[0-9]*; do echo \"${p#/proc/} $(cat $p/comm) $(cat $p/wchan)\"; done 2>/dev/null | grep -v ' kworker\\| ksoftirq\\| migration\\| cpuhp\\| rcu_\\| idle_inject'"))
	pid := strings.TrimSpace(g.MustRun("sleep 100000 | cat > /dev/null & echo $!"))
	g.MustRun("sleep 1")
	wchan := strings.TrimSpace(g.MustRun("cat /proc/" + pid + "/wchan; echo; cat /proc/" + pid + "/stack 2>/dev/null | head -5"))
	t.Logf("reader PID %s: wchan/stack %q", pid, wchan)

	// Idle, the harness's own shell sleeps in pipe_read: refused naming it.
	_, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{Consistency: ConsistencyOptions{Tries: 2}})
	if !strings.Contains(err.Error(), "(sh): pipe_read") {
		t.Fatalf("apply with the guest shell idle: %v", err)
	}
	t.Logf("with the harness shell idle: %v", err)

	opt := ApplyOptions{Consistency: ConsistencyOptions{Tries: 8, Budget: 3 * time.Second}}
	var res *Result
	var took time.Duration
	lg.whileShellBusy(t, 5, func() {
		t0 := time.Now()
		res, err = lg.pt.Apply(ctx, lg.live.Domain, p, opt)
		took = time.Since(t0)
	})
	var active *ActiveError
	if !errors.As(err, &active) || !strings.Contains(err.Error(), fmt.Sprintf("PID %s (cat): pipe_read", pid)) {
		t.Fatalf("apply with a reader asleep in pipe_read: %v", err)
	}
	t.Logf("refused in %v: %v", took.Round(time.Millisecond), err)
	c := res.Consistency
	if c == nil || c.Tries != 8 || len(c.Checks) != 8 {
		t.Fatalf("consistency report %+v", c)
	}
	t.Logf("%d tries through %s: check inside the stop %s; stop windows %s; backed off %v; scanned %d threads, %d KiB of stacks",
		c.Tries, c.Writer, stats(c.Checks), stats(c.Windows), c.Waited, c.Last.Threads, c.Last.StackBytes>>10)
	if lg.memHash(t) != before {
		t.Fatal("the refused apply changed the kernel text or the first MiB")
	}
	if st, err := lg.pt.Reconcile(lg.live.Domain); err != nil || len(st.Patches) != 0 {
		t.Fatalf("journal after the refusal: %+v %v", st, err)
	}

	// The reader leaves: the apply goes through.
	g.MustRun("kill " + pid + "; kill $(pidof sleep); sleep 0.5")
	lg.whileShellBusy(t, 3, func() { res, err = lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}) })
	if err != nil {
		t.Fatal(err)
	}
	c = res.Consistency
	t.Logf("applied after %d stop(s): check %s, window %s (%s): %s", c.Tries, stats(c.Checks), stats(c.Windows), res.Freeze.Method, res.Message)
	if out := g.MustRun("echo through-the-pipe | cat; seq 1 20000 | wc -l"); out != "through-the-pipe\n20000\n" {
		t.Fatalf("pipes with pipe_read replaced: %q", out)
	}
	// Without the check, for comparison of the stop.
	none := *p
	none.ID, none.Consistency = "pipe-read-none", ""
	rres, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("revert: %s", rres.Message)
	nres, err := lg.pt.Apply(ctx, lg.live.Domain, &none, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the same apply without the check: stop %v (%s)", nres.Freeze.Window, nres.Freeze.Method)
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, none.ID); err != nil {
		t.Fatal(err)
	}

	// The KVM path's writer: direct+ptrace cannot read registers during its
	// freeze, so the check's stops are libvirt suspends (direct+suspend).
	// Measured with a return edit: on these TCG guests direct writes leave
	// stale translations (see testDirectPtrace), which a replace edit's
	// released code would turn into an oops.
	dp, err := lg.live.WithWriter(ctx, hypervisor.WriterDirectPtrace)
	if err != nil {
		t.Fatal(err)
	}
	ks := loadExample(t, "version-kill-switch.yaml")
	ksStack := *ks
	ksStack.Consistency = ConsistencyStack
	var windows, checks, nwindows []time.Duration
	for i := 0; i < 10; i++ {
		res, err := lg.pt.Apply(ctx, dp, &ksStack, ApplyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if res.Consistency.Writer != hypervisor.WriterDirectSuspend || res.Freeze.Method != "suspend" {
			t.Fatalf("direct+ptrace with consistency: stack stopped through %s (%s)", res.Consistency.Writer, res.Freeze.Method)
		}
		windows, checks = append(windows, res.Freeze.Window), append(checks, res.Consistency.Checks...)
		if _, err := lg.pt.Revert(ctx, dp, ks.ID); err != nil {
			t.Fatal(err)
		}
		nres, err := lg.pt.Apply(ctx, dp, ks, ApplyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if nres.Freeze.Method != "ptrace" {
			t.Fatalf("direct+ptrace without the check stopped through %s", nres.Freeze.Method)
		}
		nwindows = append(nwindows, nres.Freeze.Window)
		if _, err := lg.pt.Revert(ctx, dp, ks.ID); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("direct+ptrace, consistency: stack (stopped by a libvirt suspend): stop %s, check inside it %s", stats(windows), stats(checks))
	t.Logf("direct+ptrace, no check (ptrace freeze): stop %s", stats(nwindows))
	// TCG keeps translations of directly written code: pass a gdbstub
	// write over the site so it drops them.
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, ks, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, ks.ID); err != nil {
		t.Fatal(err)
	}
	area, err := codearea.Find(lg.live.Kernel)
	if err != nil || area.Recovered || len(area.Entries()) != 0 {
		t.Fatalf("code area at the end: %+v %v", area, err)
	}
	if lg.memHash(t) != before {
		t.Error("kernel text or first MiB differ at the end")
	}
	if out := g.MustRun("echo ok | cat"); out != "ok\n" {
		t.Fatalf("guest after the test: %q", out)
	}
	if err := g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}

// replaces: a second patch on version_proc_show supersedes the first in
// one stop; an unrelated one is refused naming the owner; reverting the
// new patch leaves the original function and an empty code area.
func (lg *liveGuest) testSupersede(t *testing.T, objs string) {
	ctx := context.Background()
	g := lg.g
	original := g.MustRun("cat /proc/version")
	before := lg.memHash(t)
	first := replacePatch(filepath.Join(objs, "version_proc_show.o"), "hvpatch_version_proc_show")
	first.ID = "version-fix-1"
	if _, err := lg.pt.Apply(ctx, lg.live.Domain, first, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := g.MustRun("cat /proc/version"); !strings.Contains(got, replaceMarker) {
		t.Fatalf("/proc/version with the first patch: %q", got)
	}
	second := &Patch{ID: "version-fix-2", Match: Match{Release: StringList{"*"}}, Consistency: ConsistencyStack,
		Edits: []Edit{{Kind: KindReplace, Function: "version_proc_show", Object: filepath.Join(objs, "multi.o"), With: "hvpatch_multi_version"}}}

	// Not listing the first: refused naming it.
	held := lg.memHash(t)
	_, err := lg.pt.Apply(ctx, lg.live.Domain, second, ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), "which patch version-fix-1 (applied") || !strings.Contains(err.Error(), "replaces: [version-fix-1]") {
		t.Fatalf("unrelated patch on a patched function: %v", err)
	}
	t.Logf("refused: %v", err)
	if lg.memHash(t) != held {
		t.Fatal("the refused patch changed guest memory")
	}

	second.Replaces = StringList{first.ID}
	counter := &stopCounter{CodeWriter: lg.live.Writer}
	d := lg.live.Domain
	d.Writer = counter
	res, err := lg.pt.Apply(ctx, d, second, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	switchStops := counter.stops - 1 - res.ReleaseWaits // the release's stops come after
	t.Logf("supersede: %d stop(s) in all: %d for the switch (consistency tries %d, window %v), then the first patch's code released in %v (%d retries): %s",
		counter.stops, switchStops, res.Consistency.Tries, res.Freeze.Window, res.ReleaseTime.Round(time.Millisecond), res.ReleaseWaits, res.Message)
	if switchStops != res.Consistency.Tries || res.Consistency.Tries != 1 || fmt.Sprint(res.Superseded) != "[version-fix-1]" {
		t.Fatalf("supersede took %d stops (%d tries, %d release retries), superseded %v", counter.stops, res.Consistency.Tries, res.ReleaseWaits, res.Superseded)
	}
	if got := g.MustRun("cat /proc/version"); !strings.Contains(got, "hvpatch multi: version") {
		t.Fatalf("/proc/version with the second patch: %q", got)
	}
	area, err := codearea.Find(lg.live.Kernel)
	if err != nil || len(area.Entries()) != 1 || area.Entries()[0].Name != "version-fix-2:multi.o" {
		t.Fatalf("code area after the supersede: %+v %v", area.Entries(), err)
	}
	pmdEntry := area.PMDEntryGPA
	st, err := lg.pt.Reconcile(lg.live.Domain)
	if err != nil || len(st.Differences()) != 0 || len(st.Patches) != 2 {
		t.Fatalf("status: %+v %v", st, err)
	}
	for _, ps := range st.Patches {
		t.Logf("status: %s %s (memory %s) superseded_by %q supersedes %v", ps.Entry.ID, ps.Entry.State, ps.Memory, ps.Entry.SupersededBy, ps.Entry.Supersedes)
		if ps.Entry.ID == first.ID && (ps.Entry.State != StateSuperseded || ps.Entry.SupersededBy != second.ID) {
			t.Errorf("the first patch in the journal: %+v", ps.Entry)
		}
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, first.ID); err == nil || !strings.Contains(err.Error(), "superseded by version-fix-2") {
		t.Fatalf("revert of the superseded patch: %v", err)
	}

	rres, err := lg.pt.Revert(ctx, lg.live.Domain, second.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("revert: %s", rres.Message)
	if got := g.MustRun("cat /proc/version"); got != original {
		t.Fatalf("/proc/version after the revert: %q, want %q", got, original)
	}
	lg.checkAreaGone(t, pmdEntry)
	if lg.memHash(t) != before {
		t.Error("kernel text or first MiB differ from before")
	}
	if st, err := lg.pt.Reconcile(lg.live.Domain); err != nil || len(st.Patches) != 0 {
		t.Errorf("journal after the revert: %+v %v", st, err)
	}
	if err := g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}
