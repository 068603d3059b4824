package patcher

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const fakeUUID = "0f6e3b1c-8a8d-4c3e-9d0e-5b7a1f2c3d4e"

func fakeDomain(t *testing.T, series string) (Domain, *fakeTarget, *fakeWriter, *Patcher) {
	ft := loadFixture(t, series)
	w := &fakeWriter{t: ft}
	return Domain{Name: "guest-" + series, UUID: fakeUUID, Target: ft, Writer: w}, ft, w, &Patcher{State: StateDir{Dir: t.TempDir()}}
}

func TestApplyRevert(t *testing.T) {
	for _, s := range series {
		t.Run(s, func(t *testing.T) {
			d, ft, w, pt := fakeDomain(t, s)
			ctx := context.Background()
			p := returnPatch("version_proc_show", 0)
			before := ft.snapshot()
			res, err := pt.Apply(ctx, d, p, ApplyOptions{})
			if err != nil {
				t.Fatal(err)
			}
			site := res.Plan.Edits[0].VA
			seq, _ := ReturnSequence(0, false)
			if got := ft.read(t, site, 5); !bytes.Equal(got, seq) || res.NoOp || res.Freeze.Window == 0 || w.stops != 1 || w.resumes != 1 {
				t.Fatalf("after apply: site % x, result %+v, stops %d resumes %d", got, res, w.stops, w.resumes)
			}
			j, err := pt.State.Load(d.Name, d.UUID)
			if err != nil {
				t.Fatal(err)
			}
			jp := j.Find(p.ID)
			if jp == nil || jp.State != StateApplied || jp.Release != ft.release || jp.BootID == "" || jp.BuildID != ft.fix.VmlinuxBuildID ||
				!bytes.Equal(jp.Edits[0].Old, FentryNop) || !bytes.Equal(jp.Edits[0].New, seq) || jp.Freeze == 0 {
				t.Fatalf("journal entry %+v", jp)
			}

			// A second apply is a no-op that says so, and freezes nothing.
			res, err = pt.Apply(ctx, d, p, ApplyOptions{})
			if err != nil || !res.NoOp || !strings.Contains(res.Message, "already applied") || w.stops != 1 {
				t.Fatalf("second apply: %+v, %v (stops %d)", res, err, w.stops)
			}

			res, err = pt.Revert(ctx, d, p.ID)
			if err != nil {
				t.Fatal(err)
			}
			ft.requireUnchanged(t, before)
			if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) != 0 || res.NoOp || w.resumes != 2 {
				t.Fatalf("after revert: journal %+v, result %+v", j, res)
			}
			if _, err := pt.Revert(ctx, d, p.ID); err == nil || !strings.Contains(err.Error(), "not applied") {
				t.Fatalf("second revert: %v", err)
			}
		})
	}
}

// A revert checks that the patched bytes are still there.
func TestRevertRefusesForeignBytes(t *testing.T) {
	d, ft, _, pt := fakeDomain(t, "6.1")
	ctx := context.Background()
	res, err := pt.Apply(ctx, d, returnPatch("version_proc_show", 0), ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	site := res.Plan.Edits[0].VA
	ft.mem[site] = 0xe8 // ftrace took the site over our bytes
	before := ft.snapshot()
	if _, err := pt.Revert(ctx, d, res.PatchID); err == nil || !strings.Contains(err.Error(), "neither the patched") {
		t.Fatalf("revert over foreign bytes: %v", err)
	}
	ft.requireUnchanged(t, before)
}

func TestApplyFailuresRestore(t *testing.T) {
	two := func() *Patch {
		p := returnPatch("version_proc_show", 0)
		p.Edits = append(p.Edits, returnPatch("cmdline_proc_show", 1).Edits...)
		return p
	}
	cases := []struct {
		name string
		set  func(w *fakeWriter)
		want string
	}{
		{"second write fails", func(w *fakeWriter) { w.failWriteN = 2 }, "fake write failure"},
		{"read back differs", func(w *fakeWriter) { w.corruptN = 2 }, "read back"},
		{"writer panics", func(w *fakeWriter) { w.panicN = 2 }, "panic inside the freeze"},
		{"freeze fails", func(w *fakeWriter) { w.stopErr = errors.New("no vCPU threads") }, "no vCPU threads"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, ft, w, pt := fakeDomain(t, "6.1")
			c.set(w)
			before := ft.snapshot()
			_, err := pt.Apply(context.Background(), d, two(), ApplyOptions{})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want %q", err, c.want)
			}
			ft.requireUnchanged(t, before)
			if w.stops != w.resumes {
				t.Fatalf("stopped %d times, resumed %d", w.stops, w.resumes)
			}
			if w.stops > 0 && !strings.Contains(err.Error(), "original bytes were restored") {
				t.Fatalf("error does not say the bytes were restored: %v", err)
			}
			if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) != 0 {
				t.Fatalf("journal keeps a failed apply: %+v", j.Patches)
			}
		})
	}
}

// Bytes that change between planning and the freeze are caught inside it.
func TestApplyReverifiesInsideFreeze(t *testing.T) {
	d, ft, w, pt := fakeDomain(t, "6.1")
	site := ft.sym(t, "version_proc_show").Addr
	w.beforeStop = func() { ft.mem[site] = 0xe8 }
	_, err := pt.Apply(context.Background(), d, returnPatch("version_proc_show", 0), ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), "changed before the freeze") {
		t.Fatalf("error %v", err)
	}
	if ft.mem[site] != 0xe8 || w.writes != 0 || w.resumes != 1 {
		t.Fatalf("the writer wrote %d times", w.writes)
	}
}

func TestRIPCheckedApply(t *testing.T) {
	d, ft, w, pt := fakeDomain(t, "6.1")
	sym := ft.sym(t, "cmdline_proc_show")
	cross := bytesPatch("cmdline_proc_show", 0x16, []byte{0x89, 0xdf, 0xbe}, []byte{0x90, 0x90, 0xbe})
	ctx := context.Background()
	before := ft.snapshot()
	// Without the mode: refused at planning.
	if _, err := pt.Apply(ctx, d, cross, ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "RIP-checked") {
		t.Fatalf("without the mode: %v", err)
	}
	opt := ApplyOptions{PlanOptions: PlanOptions{RIPChecked: true}}
	// A writer that cannot read RIPs while stopped is refused.
	if _, err := pt.Apply(ctx, d, cross, opt); err == nil || !strings.Contains(err.Error(), "cannot read vCPU registers") {
		t.Fatalf("writer without RIPs: %v", err)
	}
	// A vCPU strictly inside the range: refused.
	w.rips = []uint64{0xffffffff81000000, sym.Addr + 0x18}
	if _, err := pt.Apply(ctx, d, cross, opt); err == nil || !strings.Contains(err.Error(), "vCPU 1") {
		t.Fatalf("vCPU inside: %v", err)
	}
	ft.requireUnchanged(t, before)
	// At the first instruction's start (not strictly inside): allowed.
	w.rips = []uint64{sym.Addr + 0x15}
	if _, err := pt.Apply(ctx, d, cross, opt); err != nil {
		t.Fatal(err)
	}
	if got := ft.read(t, sym.Addr+0x16, 3); !bytes.Equal(got, []byte{0x90, 0x90, 0xbe}) {
		t.Fatalf("bytes after apply % x", got)
	}
}

func TestConcurrentApplySameDomain(t *testing.T) {
	d, ft, w, pt := fakeDomain(t, "6.1")
	w.hold = make(chan struct{})
	before := ft.snapshot()
	var wg sync.WaitGroup
	wg.Add(1)
	var firstErr error
	go func() {
		defer wg.Done()
		_, firstErr = pt.Apply(context.Background(), d, returnPatch("version_proc_show", 0), ApplyOptions{})
	}()
	// Wait until the first apply holds the lock (its journal says pending).
	for {
		if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	_, err := pt.Apply(context.Background(), d, returnPatch("cmdline_proc_show", 0), ApplyOptions{})
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "another patch operation is in progress on domain "+d.Name) {
		t.Fatalf("second apply: %v", err)
	}
	ft.requireUnchanged(t, before)
	close(w.hold)
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	// Other domains are not held up.
	d2, _, _, _ := fakeDomain(t, "6.12")
	d2.UUID = "11111111-2222-3333-4444-555555555555"
	if _, err := pt.Apply(context.Background(), d2, returnPatch("version_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
}

// The lock also excludes other processes: an flock held on another open
// file description of the lock file refuses the operation.
func TestLockAcrossProcesses(t *testing.T) {
	d, ft, _, pt := fakeDomain(t, "6.1")
	if err := os.MkdirAll(pt.State.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(pt.State.Dir, d.UUID+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	before := ft.snapshot()
	if _, err := pt.Apply(context.Background(), d, returnPatch("version_proc_show", 0), ApplyOptions{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("apply under a foreign flock: %v", err)
	}
	ft.requireUnchanged(t, before)
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	if _, err := pt.Apply(context.Background(), d, returnPatch("version_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestJournalFile(t *testing.T) {
	d, _, _, pt := fakeDomain(t, "6.12")
	if _, err := pt.Apply(context.Background(), d, returnPatch("version_proc_show", -1), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(pt.State.Dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != d.UUID+".json "+d.UUID+".lock" {
		t.Fatalf("state dir holds %v (temporary files left?)", names)
	}
	b, _ := os.ReadFile(filepath.Join(pt.State.Dir, d.UUID+".json"))
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"old": "0f 1f 44 00 00"`, `"new": "6a ff 58 c3 cc"`, `"state": "applied"`, `"boot_id"`, `"release": "6.12.117+deb12-cloud-amd64"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("journal lacks %s:\n%s", want, b)
		}
	}
	// A journal of another domain is refused rather than used.
	os.WriteFile(filepath.Join(pt.State.Dir, "22222222-2222-2222-2222-222222222222.json"), b, 0o600)
	if _, err := pt.State.Load("x", "22222222-2222-2222-2222-222222222222"); err == nil || !strings.Contains(err.Error(), "belongs to domain UUID") {
		t.Fatalf("foreign journal: %v", err)
	}
	os.WriteFile(filepath.Join(pt.State.Dir, d.UUID+".json"), []byte("{"), 0o600)
	if _, err := pt.State.Load(d.Name, d.UUID); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt journal: %v", err)
	}
}

func TestReconcile(t *testing.T) {
	ctx := context.Background()
	d, ft, _, pt := fakeDomain(t, "6.1")
	if _, err := pt.Apply(ctx, d, returnPatch("version_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pt.Apply(ctx, d, returnPatch("cmdline_proc_show", 1), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	st, err := pt.Reconcile(d)
	if err != nil || st.Changed || len(st.Patches) != 2 || st.Patches[0].Memory != MemApplied || st.Patches[0].Difference != "" {
		t.Fatalf("clean reconcile: %+v %v", st, err)
	}
	// Someone put the original bytes back behind our back.
	cmd := ft.sym(t, "cmdline_proc_show").Addr
	copy5 := func(va uint64, b []byte) {
		for i, c := range b {
			ft.mem[va+uint64(i)] = c
		}
	}
	copy5(cmd, FentryNop)
	// And a crash left a pending entry whose bytes did reach the guest.
	j, _ := pt.State.Load(d.Name, d.UUID)
	j.Find("kill-version-proc-show").State = StatePending
	pt.State.Save(j)
	st, err = pt.Reconcile(d)
	if err != nil || !st.Changed {
		t.Fatalf("reconcile: %+v %v", st, err)
	}
	if ps := st.Patches[0]; ps.Memory != MemApplied || !strings.Contains(ps.Difference, "recorded as applied") {
		t.Fatalf("pending entry: %+v", ps)
	}
	if ps := st.Patches[1]; ps.Memory != MemNotApplied || !strings.Contains(ps.Difference, "removed from the journal") {
		t.Fatalf("reverted entry: %+v", ps)
	}
	j, _ = pt.State.Load(d.Name, d.UUID)
	if len(j.Patches) != 1 || j.Patches[0].State != StateApplied {
		t.Fatalf("journal after reconcile: %+v", j.Patches)
	}
	// Foreign bytes are reported and kept.
	vps := ft.sym(t, "version_proc_show").Addr
	copy5(vps, []byte{0xe8, 1, 2, 3, 4})
	st, _ = pt.Reconcile(d)
	if ps := st.Patches[0]; ps.Memory != MemUnknown || !strings.Contains(ps.Difference, "e8 01 02 03 04") {
		t.Fatalf("foreign bytes: %+v", ps)
	}
	// A reboot: KASLR moved the kernel (the boot identity changes).
	ft.syms["_text"][0].Addr += 0x200000
	st, err = pt.Reconcile(d)
	if err != nil || len(st.Patches) != 1 || st.Patches[0].Memory != MemRebooted || !strings.Contains(st.Patches[0].Difference, "rebooted") {
		t.Fatalf("after reboot: %+v %v", st, err)
	}
	if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) != 0 {
		t.Fatalf("journal keeps patches of an earlier boot: %+v", j.Patches)
	}
}

// Operations start by reconciling: a reboot since the apply is reported and
// the stale entry is not reverted over a kernel that has moved.
func TestRevertAfterReboot(t *testing.T) {
	ctx := context.Background()
	d, ft, w, pt := fakeDomain(t, "6.1")
	if _, err := pt.Apply(ctx, d, returnPatch("version_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	ft.syms["_text"][0].Addr += 0x200000 // the boot identity changes
	before := ft.snapshot()
	_, err := pt.Revert(ctx, d, "kill-version-proc-show")
	if err == nil || !strings.Contains(err.Error(), "rebooted") {
		t.Fatalf("revert after reboot: %v", err)
	}
	ft.requireUnchanged(t, before)
	if w.stops != 1 {
		t.Fatalf("the guest was frozen %d times", w.stops)
	}
	// Applying again reports the stale entry it dropped.
	d2, ft2, _, _ := fakeDomain(t, "6.1")
	ft2.syms["_text"][0].Addr += 0x400000
	j, _ := pt.State.Load(d.Name, d.UUID)
	j.put(JournalPatch{ID: "stale", State: StateApplied, BootID: "an-earlier-boot", Release: ft.release})
	pt.State.Save(j)
	res, err := pt.Apply(ctx, d2, returnPatch("cmdline_proc_show", 0), ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Reconciled) != 1 || res.Reconciled[0].Entry.ID != "stale" || res.Reconciled[0].Memory != MemRebooted {
		t.Fatalf("reconciled %+v", res.Reconciled)
	}
}

// A revert of a patch some of whose edits were undone behind hvpatch's back
// restores the rest.
func TestRevertPartlyUndone(t *testing.T) {
	ctx := context.Background()
	d, ft, _, pt := fakeDomain(t, "6.1")
	p := returnPatch("version_proc_show", 0)
	p.Edits = append(p.Edits, returnPatch("cmdline_proc_show", 1).Edits...)
	res, err := pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range FentryNop {
		ft.mem[res.Plan.Edits[1].VA+uint64(i)] = c
	}
	if _, err := pt.Revert(ctx, d, p.ID); err != nil {
		t.Fatal(err)
	}
	for _, e := range res.Plan.Edits {
		if got := ft.read(t, e.VA, 5); !bytes.Equal(got, FentryNop) {
			t.Fatalf("%s after revert: % x", e.Symbol, got)
		}
	}
}

// Another patch id over the same site is refused even when its bytes are
// the ones already there.
func TestApplyOverAnotherPatch(t *testing.T) {
	ctx := context.Background()
	d, ft, _, pt := fakeDomain(t, "6.1")
	if _, err := pt.Apply(ctx, d, returnPatch("version_proc_show", 0), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	same := returnPatch("version_proc_show", 0)
	same.ID = "same-bytes-other-id"
	before := ft.snapshot()
	if _, err := pt.Apply(ctx, d, same, ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "which patch kill-version-proc-show (applied, return edit) already patched") ||
		!strings.Contains(err.Error(), "replaces: [kill-version-proc-show]") {
		t.Fatalf("second patch over the same site: %v", err)
	}
	ft.requireUnchanged(t, before)
	if j, _ := pt.State.Load(d.Name, d.UUID); len(j.Patches) != 1 {
		t.Fatalf("journal %+v", j.Patches)
	}
}
