package patcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/hypervisor"
)

func TestParseConsistencyAndReplaces(t *testing.T) {
	base := "id: fix-2\nmatch: {release: \"6.1.*\"}\nedits:\n  - {kind: return, function: f, value: 0}\n"
	p, err := ParsePatch([]byte(base + "consistency: stack\nreplaces: [fix-1, fix-0]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !p.StackConsistency() || fmt.Sprint(p.Replaces) != "[fix-1 fix-0]" || !p.Supersedes("fix-0") || p.Supersedes("fix-2") {
		t.Fatalf("parsed %+v", p)
	}
	p, err = ParsePatch([]byte(base + "replaces: fix-1\nconsistency: none\n"))
	if err != nil || p.StackConsistency() || fmt.Sprint(p.Replaces) != "[fix-1]" {
		t.Fatalf("one id, none: %+v %v", p, err)
	}
	if p, _ := ParsePatch([]byte(base)); p.StackConsistency() || p.Consistency != "" {
		t.Fatal("the default is no check")
	}
	for _, c := range []struct{ extra, want string }{
		{"consistency: always\n", `consistency "always": want none or stack`},
		{"replaces: [fix-2]\n", "replaces itself"},
		{"replaces: [a, a]\n", "lists a twice"},
		{"replaces: [\"Bad Id\"]\n", "is not a patch id"},
	} {
		if _, err := ParsePatch([]byte(base + c.extra)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.extra, err, c.want)
		}
	}
}

func TestConsistencyBackoff(t *testing.T) {
	o := ConsistencyOptions{}.withDefaults()
	var got []string
	for try := 1; try <= 6; try++ {
		got = append(got, o.backoff(try).String())
	}
	if want := "[10ms 15ms 22.5ms 33.75ms 50ms 50ms]"; fmt.Sprint(got) != want {
		t.Fatalf("back-off %v, want %s", got, want)
	}
	if o.Tries != 20 || o.Budget != 5*time.Second {
		t.Fatalf("defaults %+v", o)
	}
}

// busyView is a fake activeness view: the first busy calls report a task
// sleeping in the first function searched.
type busyView struct {
	mu           sync.Mutex
	busy, calls  int
	rips, stacks []codearea.Span
}

func (b *busyView) scan(ctx context.Context, sg StoppedGuest, rips, stacks []codearea.Span) (*codearea.Activity, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	b.rips, b.stacks = rips, stacks
	if _, err := sg.Registers(ctx); err != nil {
		return nil, err
	}
	act := &codearea.Activity{Threads: 1}
	if b.busy < 0 || b.calls <= b.busy {
		act.Uses = []codearea.Use{{Span: stacks[0].Name, VCPU: -1, PID: 42, Comm: "reader", Value: stacks[0].Lo + 0x10, At: 0xffffc90000013f00}}
	}
	return act, nil
}

func stackPatch() *Patch {
	p := returnPatch("version_proc_show", 0)
	p.Consistency = ConsistencyStack
	return p
}

// consistency: stack retries while the function is in use, then writes in
// the stop whose check passed.
func TestStackConsistencyRetries(t *testing.T) {
	d, ft, w, pt := fakeDomain(t, "6.1")
	w.rips = []uint64{0xffffffff81000000}
	view := &busyView{busy: 3}
	pt.activity = view.scan
	res, err := pt.Apply(context.Background(), d, stackPatch(), ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c := res.Consistency
	if c == nil || c.Tries != 4 || w.stops != 4 || w.resumes != 4 || len(c.Checks) != 4 || c.Last != nil {
		t.Fatalf("report %+v, stops %d resumes %d", c, w.stops, w.resumes)
	}
	if c.Waited != (10+15+22.5)*1e6 {
		t.Errorf("waited %v between tries", c.Waited)
	}
	sym := ft.sym(t, "version_proc_show")
	if fmt.Sprint(view.rips) != fmt.Sprint([]codearea.Span{{Name: sym.Name, Lo: sym.Addr, Hi: sym.Addr + sym.Size}}) ||
		fmt.Sprint(view.stacks) != fmt.Sprint([]codearea.Span{{Name: sym.Name, Lo: sym.Addr + 1, Hi: sym.Addr + sym.Size + 1}}) {
		t.Errorf("searched RIPs %v stacks %v (function at %#x size %#x)", view.rips, view.stacks, sym.Addr, sym.Size)
	}
	seq, _ := ReturnSequence(0, false)
	if got := ft.read(t, res.Plan.Edits[0].VA, 5); !bytes.Equal(got, seq) {
		t.Fatalf("site % x", got)
	}
	j, _ := pt.State.Load(d.Name, d.UUID)
	if jp := j.Find("kill-version-proc-show"); jp == nil || jp.Tries != 4 || jp.Consistency != ConsistencyStack || jp.State != StateApplied {
		t.Fatalf("journal %+v", j.Patches)
	}
	t.Log(res.Message)
}

// Still in use when the tries run out: refused naming the task and the
// function; memory and journal as before.
func TestStackConsistencyRefuses(t *testing.T) {
	d, ft, w, pt := fakeDomain(t, "6.1")
	w.rips = []uint64{0}
	pt.activity = (&busyView{busy: -1}).scan
	before := ft.snapshot()
	opt := ApplyOptions{Consistency: ConsistencyOptions{Tries: 5, MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond}}
	res, err := pt.Apply(context.Background(), d, stackPatch(), opt)
	var active *ActiveError
	if !errors.As(err, &active) || active.Tries != 5 || !strings.Contains(err.Error(), "PID 42 (reader): version_proc_show") ||
		!strings.Contains(err.Error(), "after 5 tries") || !strings.Contains(err.Error(), "guest memory is unchanged") {
		t.Fatalf("apply of a busy function: %v", err)
	}
	t.Log(err)
	if w.stops != 5 || w.resumes != 5 || w.writes != 0 || res.Consistency.Tries != 5 || res.Consistency.Last == nil {
		t.Fatalf("stops %d resumes %d writes %d report %+v", w.stops, w.resumes, w.writes, res.Consistency)
	}
	ft.requireUnchanged(t, before)
	if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) != 0 {
		t.Fatalf("journal after the refusal: %+v", j.Patches)
	}
	// The time budget bounds the tries too.
	w.stops = 0
	opt.Consistency = ConsistencyOptions{Tries: 100, Budget: 60 * time.Millisecond, MinBackoff: 20 * time.Millisecond}
	if _, err := pt.Apply(context.Background(), d, stackPatch(), opt); !errors.As(err, &active) || w.stops < 2 || w.stops > 4 {
		t.Fatalf("budget: %d stops, %v", w.stops, err)
	}
	ft.requireUnchanged(t, before)
	// Without the check the same patch applies at once.
	if _, err := pt.Apply(context.Background(), d, returnPatch("version_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
}

// A writer whose stops cannot read registers (a ptrace freeze) uses the
// domain's RegisterWriter for the check, or the apply is refused.
func TestStackConsistencyNeedsRegisters(t *testing.T) {
	d, ft, w, pt := fakeDomain(t, "6.1")
	view := &busyView{}
	pt.activity = view.scan
	before := ft.snapshot()
	_, err := pt.Apply(context.Background(), d, stackPatch(), ApplyOptions{})
	if !errors.Is(err, hypervisor.ErrNoRegisters) || !strings.Contains(err.Error(), "consistency: stack reads every vCPU's registers") || w.stops != 0 {
		t.Fatalf("writer without registers: %v (stops %d)", err, w.stops)
	}
	ft.requireUnchanged(t, before)
	rw := &fakeWriter{t: ft, rips: []uint64{0}}
	d.RegisterWriter = rw
	res, err := pt.Apply(context.Background(), d, stackPatch(), ApplyOptions{})
	if err != nil || w.stops != 0 || rw.stops != 1 || view.calls != 1 || res.Consistency.Writer != "fake" {
		t.Fatalf("with a register writer: %v; stops %d/%d", err, w.stops, rw.stops)
	}
}

// A cumulative patch supersedes an applied one in one stop: the edit it
// covers is overwritten, the one it does not is put back; revert of the
// new patch leaves the functions original.
func TestReplacesSupersedes(t *testing.T) {
	ctx := context.Background()
	d, ft, w, pt := fakeDomain(t, "6.1")
	before := ft.snapshot()
	zero := int64(0)
	old := &Patch{ID: "fix-1", Match: Match{Release: StringList{"*"}}, Edits: []Edit{
		{Kind: KindReturn, Function: "version_proc_show", Value: &zero},
		{Kind: KindReturn, Function: "cmdline_proc_show", Value: &zero},
	}}
	if _, err := pt.Apply(ctx, d, old, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	one := int64(1)
	cum := &Patch{ID: "fix-2", Match: Match{Release: StringList{"*"}}, Replaces: StringList{"fix-1", "never-applied"},
		Edits: []Edit{{Kind: KindReturn, Function: "version_proc_show", Value: &one}}}

	// Without replaces: refused naming the owner.
	unrelated := *cum
	unrelated.ID, unrelated.Replaces = "other", nil
	snap := ft.snapshot()
	if _, err := pt.Apply(ctx, d, &unrelated, ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "which patch fix-1 (applied") || !strings.Contains(err.Error(), "replaces: [fix-1]") {
		t.Fatalf("unrelated patch on a patched function: %v", err)
	}
	ft.requireUnchanged(t, snap)

	// The dry run plans the supersede.
	pl, err := pt.Plan(d, cum, PlanOptions{})
	if err != nil || len(pl.Supersedes) != 1 || len(pl.Undo) != 1 || pl.Undo[0].Symbol != "cmdline_proc_show" || pl.Edits[0].PrevPatch != "fix-1" {
		t.Fatalf("plan: %+v %v", pl, err)
	}
	ft.requireUnchanged(t, snap)

	w.stops, w.writes = 0, 0
	res, err := pt.Apply(ctx, d, cum, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if w.stops != 1 || w.writes != 2 || fmt.Sprint(res.Superseded) != "[fix-1]" {
		t.Fatalf("supersede: %d stops, %d writes, superseded %v", w.stops, w.writes, res.Superseded)
	}
	seq1, _ := ReturnSequence(1, false)
	vps, cps := ft.sym(t, "version_proc_show"), ft.sym(t, "cmdline_proc_show")
	if got := ft.read(t, res.Plan.Edits[0].VA, 5); !bytes.Equal(got, seq1) {
		t.Fatalf("version_proc_show site % x", got)
	}
	if got := ft.read(t, res.Plan.Undo[0].VA, 5); !bytes.Equal(got, FentryNop) || res.Plan.Undo[0].VA < cps.Addr || res.Plan.Edits[0].VA < vps.Addr {
		t.Fatalf("cmdline_proc_show site % x", got)
	}
	t.Log(res.Message)
	j, _ := pt.State.Load(d.Name, d.UUID)
	if a, b := j.Find("fix-1"), j.Find("fix-2"); a == nil || a.State != StateSuperseded || a.SupersededBy != "fix-2" || b == nil || fmt.Sprint(b.Supersedes) != "[fix-1]" {
		t.Fatalf("journal %+v", j.Patches)
	}
	st, err := pt.Reconcile(d)
	if err != nil || len(st.Differences()) != 0 || st.Patches[0].Memory != MemSuperseded {
		t.Fatalf("status: %+v %v", st, err)
	}
	if _, err := pt.Revert(ctx, d, "fix-1"); err == nil || !strings.Contains(err.Error(), "superseded by fix-2") {
		t.Fatalf("revert of the superseded patch: %v", err)
	}
	again, err := pt.Apply(ctx, d, cum, ApplyOptions{})
	if err != nil || !again.NoOp {
		t.Fatalf("second apply: %+v %v", again, err)
	}
	rres, err := pt.Revert(ctx, d, "fix-2")
	if err != nil || !strings.Contains(rres.Message, "(fix-1) are gone too") {
		t.Fatalf("revert: %+v %v", rres, err)
	}
	ft.requireUnchanged(t, before)
	if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) != 0 {
		t.Fatalf("journal after revert: %+v", j.Patches)
	}
	// The old patch applies again now.
	if _, err := pt.Apply(ctx, d, old, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
}

// A failure inside the supersede's stop puts the superseded patch's bytes
// back.
func TestReplacesSupersedeRollback(t *testing.T) {
	ctx := context.Background()
	d, ft, w, pt := fakeDomain(t, "6.1")
	zero, one := int64(0), int64(1)
	old := &Patch{ID: "fix-1", Match: Match{Release: StringList{"*"}}, Edits: []Edit{
		{Kind: KindReturn, Function: "version_proc_show", Value: &zero},
		{Kind: KindReturn, Function: "cmdline_proc_show", Value: &zero},
	}}
	if _, err := pt.Apply(ctx, d, old, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	snap := ft.snapshot()
	cum := &Patch{ID: "fix-2", Match: Match{Release: StringList{"*"}}, Replaces: StringList{"fix-1"},
		Edits: []Edit{{Kind: KindReturn, Function: "version_proc_show", Value: &one}}}
	w.writes, w.failWriteN = 0, 2
	if _, err := pt.Apply(ctx, d, cum, ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "original bytes were restored") {
		t.Fatalf("failing supersede: %v", err)
	}
	ft.requireUnchanged(t, snap)
	j, _ := pt.State.Load(d.Name, d.UUID)
	if len(j.Patches) != 1 || j.Patches[0].State != StateApplied || j.Patches[0].SupersededBy != "" {
		t.Fatalf("journal %+v", j.Patches)
	}
}

// The lock is host-wide: two Patchers with different state directories
// (the CLI with its own --state-dir, and hvpatchd) exclude each other on
// one domain, and a foreign flock on the host lock file is respected.
func TestHostLockAcrossStateDirs(t *testing.T) {
	lockDir := t.TempDir()
	d, ft, w, _ := fakeDomain(t, "6.1")
	a := &Patcher{State: StateDir{Dir: t.TempDir(), LockDir: lockDir}}
	b := &Patcher{State: StateDir{Dir: t.TempDir(), LockDir: lockDir}}
	w.hold = make(chan struct{})
	var wg sync.WaitGroup
	var firstErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, firstErr = a.Apply(context.Background(), d, returnPatch("version_proc_show", 0), ApplyOptions{})
	}()
	for {
		if j, _ := a.State.Load(d.Name, d.UUID); len(j.Patches) == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	// Another process's view: the in-process guard would refuse anyway, so
	// check the flock itself too.
	f, err := os.OpenFile(filepath.Join(lockDir, d.UUID+".lock"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("the host lock file is not held during an apply: %v", err)
	}
	f.Close()
	before := ft.snapshot()
	if _, err := b.Apply(context.Background(), d, returnPatch("cmdline_proc_show", 0), ApplyOptions{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("second state dir: %v", err)
	}
	ft.requireUnchanged(t, before)
	close(w.hold)
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}

	// A foreign process holding the host lock: refused, whatever the state
	// directory, naming the lock file.
	f, err = os.OpenFile(filepath.Join(lockDir, d.UUID+".lock"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	w.hold = nil
	_, err = b.Apply(context.Background(), d, returnPatch("cmdline_proc_show", 0), ApplyOptions{})
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "host-wide lock "+filepath.Join(lockDir, d.UUID+".lock")) {
		t.Fatalf("under a foreign host lock: %v", err)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	if _, err := b.Apply(context.Background(), d, returnPatch("cmdline_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if (StateDir{}).HostLockDir() != os.Getenv("HVPATCH_LOCK_DIR") {
		t.Error("HVPATCH_LOCK_DIR not honoured")
	}
}
