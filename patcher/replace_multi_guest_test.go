package patcher

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/codearea"
)

// multiReplaceSource holds two replacement functions in one object, for
// version_proc_show and cmdline_proc_show, both
// static int f(struct seq_file *m, void *v) in 6.1 and 6.12 (checked against
// the guest's BTF by the test).
const multiReplaceSource = `
struct seq_file;
extern void seq_printf(struct seq_file *m, const char *fmt, ...);
int hvpatch_multi_version(struct seq_file *m, void *v) { seq_printf(m, "hvpatch multi: version\n"); return 0; }
int hvpatch_multi_cmdline(struct seq_file *m, void *v) { seq_printf(m, "hvpatch multi: cmdline\n"); return 0; }
`

// stopCounter counts the stops a writer makes.
type stopCounter struct {
	CodeWriter
	stops int
}

func (w *stopCounter) Stop(ctx context.Context) (StoppedGuest, error) {
	w.stops++
	return w.CodeWriter.Stop(ctx)
}

// checkSeqShowProto checks in the guest's BTF that fn is
// int fn(struct seq_file *, void *).
func (lg *liveGuest) checkSeqShowProto(t *testing.T, fn string) {
	t.Helper()
	spec := lg.live.Kernel.BTF
	if spec == nil {
		t.Fatal("the guest kernel has no BTF")
	}
	var f *btf.Func
	if err := spec.TypeByName(fn, &f); err != nil {
		t.Fatalf("BTF %s: %v", fn, err)
	}
	proto, ok := f.Type.(*btf.FuncProto)
	if !ok || len(proto.Params) != 2 {
		t.Fatalf("BTF %s: %v", fn, f.Type)
	}
	ret, ok := btf.UnderlyingType(proto.Return).(*btf.Int)
	p0, ok0 := btf.UnderlyingType(proto.Params[0].Type).(*btf.Pointer)
	p1, ok1 := btf.UnderlyingType(proto.Params[1].Type).(*btf.Pointer)
	if !ok || !ok0 || !ok1 || ret.Size != 4 || p0.Target.TypeName() != "seq_file" {
		t.Fatalf("BTF %s is not int (struct seq_file *, void *): %v", fn, proto)
	}
	if _, isVoid := btf.UnderlyingType(p1.Target).(*btf.Void); !isVoid {
		t.Fatalf("BTF %s: second parameter %v", fn, p1.Target)
	}
}

// One object, two replacement functions, one patch with two replace edits:
// one code-area entry, one stop for the apply, both files changed; revert
// puts both back and empties the code area. A patch whose object hash does
// not match is refused with guest memory untouched.
func (lg *liveGuest) testReplaceTwoEdits(t *testing.T, objs string) {
	ctx := context.Background()
	g := lg.g
	for _, fn := range []string{"version_proc_show", "cmdline_proc_show"} {
		lg.checkSeqShowProto(t, fn)
	}
	obj := filepath.Join(objs, "multi.o")
	origVersion, origCmdline := g.MustRun("cat /proc/version"), g.MustRun("cat /proc/cmdline")
	before := lg.memHash(t)
	p := &Patch{ID: "multi-replace", Match: Match{Release: StringList{"*"}},
		Objects: map[string]string{obj: fileSHA(t, obj)},
		Edits: []Edit{
			{Kind: KindReplace, Function: "version_proc_show", Object: obj, With: "hvpatch_multi_version"},
			{Kind: KindReplace, Function: "cmdline_proc_show", Object: obj, With: "hvpatch_multi_cmdline"},
		}}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}

	// Refused: the recorded hash is not the object's.
	bad := *p
	bad.Objects = map[string]string{obj: strings.Repeat("00", 32)}
	_, err := lg.pt.Apply(ctx, lg.live.Domain, &bad, ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), "SHA-256 mismatch") || !strings.Contains(err.Error(), obj) {
		t.Fatalf("sha mismatch: %v", err)
	}
	t.Logf("refused: %v", err)
	if lg.memHash(t) != before {
		t.Fatal("the refused patch changed the kernel text or the first MiB")
	}

	pl, err := MakePlan(lg.live.Target, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r0, r1 := pl.Edits[0].Replace, pl.Edits[1].Replace
	if r0.Placement == nil || r0.Placement != r1.Placement || r0.Entry != "multi-replace:multi.o" || r0.WithAddr == r1.WithAddr {
		t.Fatalf("plan: entries %q %q, placements %p %p, targets %#x %#x", r0.Entry, r1.Entry, r0.Placement, r1.Placement, r0.WithAddr, r1.WithAddr)
	}

	counter := &stopCounter{CodeWriter: lg.live.Writer}
	d := lg.live.Domain
	d.Writer = counter
	res, err := lg.pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	version, cmdline := g.MustRun("cat /proc/version"), g.MustRun("cat /proc/cmdline")
	if !strings.Contains(version, "hvpatch multi: version") || !strings.Contains(cmdline, "hvpatch multi: cmdline") {
		t.Fatalf("with both replacements: /proc/version %q, /proc/cmdline %q", version, cmdline)
	}
	if counter.stops != 1 {
		t.Fatalf("the apply stopped the guest %d times, want 1", counter.stops)
	}
	t.Logf("apply: %d stop, guest frozen %v (%s): %s", counter.stops, res.Freeze.Window, res.Freeze.Method, res.Message)
	area, err := codearea.Find(lg.live.Kernel)
	if err != nil || len(area.Entries()) != 1 || area.Entries()[0].Name != "multi-replace:multi.o" {
		t.Fatalf("code area while applied: %+v %v", area.Entries(), err)
	}
	pmdEntry := area.PMDEntryGPA
	st, err := lg.pt.Reconcile(lg.live.Domain)
	if err != nil || len(st.Patches) != 1 || st.Patches[0].Memory != MemApplied {
		t.Fatalf("status while applied: %+v %v", st, err)
	}
	for i, je := range st.Patches[0].Entry.Edits {
		if je.AreaEntry != "multi-replace:multi.o" || je.With != p.Edits[i].With {
			t.Errorf("journal edit %d: entry %q with %q", i+1, je.AreaEntry, je.With)
		}
	}
	if again, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{}); err != nil || !again.NoOp {
		t.Fatalf("second apply: %+v %v", again, err)
	}

	rres, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("revert: jumps removed in one stop of %v (%s); release %v, %d retries",
		rres.Freeze.Window, rres.Freeze.Method, rres.ReleaseTime, rres.ReleaseWaits)
	if got := g.MustRun("cat /proc/version"); got != origVersion {
		t.Errorf("/proc/version after revert: %q, want %q", got, origVersion)
	}
	if got := g.MustRun("cat /proc/cmdline"); got != origCmdline {
		t.Errorf("/proc/cmdline after revert: %q, want %q", got, origCmdline)
	}
	lg.checkAreaGone(t, pmdEntry)
	if lg.memHash(t) != before {
		t.Error("kernel text or first MiB differ from before the apply")
	}
	if st, err := lg.pt.Reconcile(lg.live.Domain); err != nil || len(st.Patches) != 0 {
		t.Errorf("journal after revert: %+v %v", st, err)
	}
	if err := g.ConsoleError(); err != nil {
		t.Fatal(errors.Join(err))
	}
}
