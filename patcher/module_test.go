package patcher

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

// modTarget is a fake target with loaded modules: each module symbol is
// placed over a kernel function of the fixture, whose bytes serve as the
// module function's code.
type modTarget struct {
	*fakeTarget
	mods  map[string][]Symbol
	bases map[string]uint64 // text base by module (0x1000 when unset)
}

func (m *modTarget) LoadedModules() ([]LoadedModule, error) {
	var out []LoadedModule
	for name := range m.mods {
		base := m.bases[name]
		if base == 0 {
			base = 0x1000
		}
		out = append(out, LoadedModule{Name: name, Base: base, Settled: true})
	}
	return out, nil
}

func (m *modTarget) ModuleSymbols(module, name string) ([]Symbol, error) {
	syms, ok := m.mods[module]
	if !ok {
		return nil, fmt.Errorf("module %s is not loaded in the guest", module)
	}
	var out []Symbol
	for _, s := range syms {
		if s.Name == name {
			out = append(out, s)
		}
	}
	return out, nil
}

func TestModuleEditPlansOnModuleSymbol(t *testing.T) {
	ft := loadFixture(t, "6.1")
	host := ft.sym(t, "cmdline_proc_show")
	mt := &modTarget{fakeTarget: ft, mods: map[string][]Symbol{
		"dummy": {{Name: "dummy_change_carrier", Addr: host.Addr, Size: host.Size}},
	}}
	p := returnPatch("dummy_change_carrier", -1)
	p.Edits[0].Module = "dummy"
	pl, err := MakePlan(mt, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if e := pl.Edits[0]; e.VA != host.Addr || e.Symbol != "dummy_change_carrier" {
		t.Fatalf("planned %+v", e)
	}
	if s := p.Edits[0].String(); !strings.Contains(s, "dummy_change_carrier [dummy] returns -1") {
		t.Fatalf("edit text %q", s)
	}
	// Apply and revert through the engine, as for a kernel function.
	d, _, _, pt := fakeDomain(t, "6.1")
	d.Target = mt
	d.Writer = &fakeWriter{t: ft}
	ctx := context.Background()
	if _, err := pt.Apply(ctx, d, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pt.Revert(ctx, d, p.ID); err != nil {
		t.Fatal(err)
	}

	// The name alone is the kernel image's: not found there.
	q := returnPatch("dummy_change_carrier", -1)
	if _, err := MakePlan(mt, q, PlanOptions{}); err == nil || !strings.Contains(err.Error(), "unknown symbol dummy_change_carrier") {
		t.Fatalf("without module: %v", err)
	}
	// A module that is not loaded, a symbol the module lacks.
	q.Edits[0].Module = "nf_tables"
	if _, err := MakePlan(mt, q, PlanOptions{}); err == nil || !strings.Contains(err.Error(), "not loaded") {
		t.Fatalf("module not loaded: %v", err)
	}
	q = returnPatch("dummy_xmit", 0)
	q.Edits[0].Module = "dummy"
	if _, err := MakePlan(mt, q, PlanOptions{}); err == nil || !strings.Contains(err.Error(), "in module dummy") {
		t.Fatalf("symbol not in the module: %v", err)
	}
	// A target without module symbols says so.
	if _, err := MakePlan(ft, p, PlanOptions{}); err == nil || !strings.Contains(err.Error(), "cannot read module symbols") {
		t.Fatalf("plain target: %v", err)
	}
}

func TestModuleFieldValidated(t *testing.T) {
	p := returnPatch("f", 0)
	p.Edits[0].Module = "bad name/"
	if err := p.Validate(); err == nil || !strings.Contains(err.Error(), "module") {
		t.Fatalf("bad module name accepted: %v", err)
	}
	p.Edits[0].Module = "nf_tables"
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
}

// A patch on a module function: unloading the module makes the journal
// entry "module gone" (kept, not read from memory), a revert then only
// drops it; loading the module again (another base) and applying puts the
// patch on the new copy. The same base with the original bytes back at
// the site is a reload too.
func TestModuleGoneAndBack(t *testing.T) {
	d, mt, carrier, pt := dummyLoaded(t)
	ft := mt.fakeTarget
	ctx := context.Background()
	p := returnPatch("dummy_change_carrier", -1)
	p.Edits[0].Module = "dummy"
	if missing, _, err := MissingModules(mt, p); err != nil || len(missing) != 0 {
		t.Fatalf("missing %v %v", missing, err)
	}
	res, err := pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if e := res.Plan.Edits[0]; e.Module != "dummy" || e.ModuleBase != 0x1000 {
		t.Fatalf("planned module %q base %#x", e.Module, e.ModuleBase)
	}
	state := func() PatchStatus {
		t.Helper()
		ps := reconciled(t, pt, d, p.ID)
		if ps == nil {
			t.Fatalf("%s not in the journal", p.ID)
		}
		return *ps
	}
	if ps := state(); ps.Memory != MemApplied {
		t.Fatalf("applied: memory %s", ps.Memory)
	}

	// Unloaded.
	delete(mt.mods, "dummy")
	if missing, _, _ := MissingModules(mt, p); len(missing) != 1 || missing[0] != "dummy" {
		t.Fatalf("missing %v", missing)
	}
	ps := state()
	if ps.Memory != MemModuleGone || ps.Entry.State != StateModuleGone || !strings.Contains(ps.Difference, "module dummy was unloaded") {
		t.Fatalf("after unload: %+v", ps)
	}
	if ps := state(); ps.Memory != MemModuleGone || ps.Difference != "" {
		t.Fatalf("second reconcile: %+v", ps)
	}
	rep, err := pt.ReleaseModuleGone(ctx, d)
	if err != nil || len(rep.Gone) != 1 || len(rep.Released) != 0 {
		t.Fatalf("ReleaseModuleGone: %+v %v", rep, err)
	}
	if _, err := pt.Apply(ctx, d, p, ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "not loaded") {
		t.Fatalf("apply without the module: %v", err)
	}

	// Loaded again elsewhere: the fixture's bytes stand for fresh code, so
	// put back the original first (the patch is on the old copy).
	if err := ft.poke(res.Plan.Edits[0].VA, res.Plan.Edits[0].Old); err != nil {
		t.Fatal(err)
	}
	mt.mods["dummy"], mt.bases["dummy"] = carrier, 0x2000
	if _, err := pt.Apply(ctx, d, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if ps := state(); ps.Memory != MemApplied || ps.Entry.Edits[0].ModuleBase != 0x2000 {
		t.Fatalf("applied again: %+v", ps)
	}

	// Loaded again at the same base: the site holds the original bytes.
	if err := ft.poke(res.Plan.Edits[0].VA, res.Plan.Edits[0].Old); err != nil {
		t.Fatal(err)
	}
	if ps := state(); ps.Memory != MemModuleGone || !strings.Contains(ps.Difference, "original code") {
		t.Fatalf("same base, fresh code: %+v", ps)
	}
	// A revert of a gone patch drops it.
	rres, err := pt.Revert(ctx, d, p.ID)
	if err != nil || !strings.Contains(rres.Message, "unloaded") {
		t.Fatalf("revert: %+v %v", rres, err)
	}
	st, _ := pt.Reconcile(d)
	if len(st.Patches) != 0 {
		t.Fatalf("journal after revert: %+v", st.Patches)
	}
}

// poke writes bytes the fixture holds (a module loaded again with fresh code).
func (f *fakeTarget) poke(va uint64, b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, c := range b {
		if _, ok := f.mem[va+uint64(i)]; !ok {
			return fmt.Errorf("%#x: not in the fixture", va+uint64(i))
		}
		f.mem[va+uint64(i)] = c
	}
	return nil
}

// reconciled reconciles d's journal and returns patch id's status, nil
// when the journal no longer has it.
func reconciled(t *testing.T, pt *Patcher, d Domain, id string) *PatchStatus {
	t.Helper()
	st, err := pt.Reconcile(d)
	if err != nil {
		t.Fatal(err)
	}
	for _, ps := range st.Patches {
		if ps.Entry.ID == id {
			return &ps
		}
	}
	return nil
}

// dummyLoaded is a fake 6.1 domain with module dummy loaded (at 0x1000):
// its dummy_change_carrier stands over the bytes of cmdline_proc_show.
func dummyLoaded(t *testing.T) (Domain, *modTarget, []Symbol, *Patcher) {
	d, ft, _, pt := fakeDomain(t, "6.1")
	host := ft.sym(t, "cmdline_proc_show")
	carrier := []Symbol{{Name: "dummy_change_carrier", Addr: host.Addr, Size: host.Size}}
	mt := &modTarget{fakeTarget: ft, mods: map[string][]Symbol{"dummy": carrier}, bases: map[string]uint64{}}
	d.Target = mt
	return d, mt, carrier, pt
}

// TestMixedPatchModuleGone: a patch on a kernel function and a module
// function. Applied before the module is loaded: the kernel's edit goes in
// alone (journal: module gone), and applying again changes nothing. The
// module loads: the apply writes the module's edit only and carries the
// kernel's over, whose revert still restores the original bytes. The
// module goes: the kernel's edit stays (the journal says module gone). It
// comes back: the same again. It goes again: a revert restores the kernel
// function, which was left patched before this was handled.
func TestMixedPatchModuleGone(t *testing.T) {
	d, mt, carrier, pt := dummyLoaded(t)
	ft := mt.fakeTarget
	ctx := context.Background()
	p := returnPatch("version_proc_show", 0)
	p.ID = "mixed"
	mod := returnPatch("dummy_change_carrier", -1).Edits[0]
	mod.Module = "dummy"
	p.Edits = append(p.Edits, mod)

	// Not loaded yet: the kernel part alone, once.
	delete(mt.mods, "dummy")
	part, err := pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatalf("apply with the module not loaded: %v", err)
	}
	if len(part.Plan.Edits) != 1 || part.Plan.Edits[0].Symbol != "version_proc_show" || !strings.Contains(part.Message, "wait for the module") {
		t.Fatalf("apply with the module not loaded: %s %+v", part.Message, part.Plan.Edits)
	}
	if again, err := pt.Apply(ctx, d, p, ApplyOptions{}); err != nil || !again.NoOp {
		t.Fatalf("second apply with the module not loaded: %+v %v", again, err)
	}
	mt.mods["dummy"] = carrier
	res, err := pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Plan.Edits[0].Applied || res.Plan.Edits[1].Applied {
		t.Fatalf("module loaded: want the kernel edit carried and the module edit written: %+v", res.Plan.Edits)
	}
	kern, modEdit := res.Plan.Edits[0], res.Plan.Edits[1]
	if string(kern.Old) != string(part.Plan.Edits[0].Old) {
		t.Fatalf("the carried kernel edit restores % x, its first apply found % x", kern.Old, part.Plan.Edits[0].Old)
	}
	read := func(e PlannedEdit) string {
		t.Helper()
		b := make([]byte, len(e.New))
		if err := mt.ReadVirt(e.VA, b); err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	entry := func() *JournalPatch {
		t.Helper()
		if ps := reconciled(t, pt, d, p.ID); ps != nil {
			return &ps.Entry
		}
		return nil
	}

	delete(mt.mods, "dummy")
	if jp := entry(); jp == nil || jp.State != StateModuleGone {
		t.Fatalf("after the unload: %+v", jp)
	}
	if read(kern) != string(kern.New) {
		t.Fatal("the kernel's edit went with the module")
	}

	// Back at another base with fresh code.
	if err := ft.poke(modEdit.VA, modEdit.Old); err != nil {
		t.Fatal(err)
	}
	mt.mods["dummy"], mt.bases["dummy"] = carrier, 0x2000
	res2, err := pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil {
		t.Fatalf("apply after the module came back: %v", err)
	}
	if !res2.Plan.Edits[0].Applied || res2.Plan.Edits[1].Applied {
		t.Fatalf("want the kernel edit carried and the module edit written: %+v", res2.Plan.Edits)
	}
	jp := entry()
	if jp == nil || jp.State != StateApplied || len(jp.Edits) != 2 || string(jp.Edits[0].Old) != string(kern.Old) {
		t.Fatalf("journal after the second apply: %+v", jp)
	}
	if read(modEdit) != string(modEdit.New) || read(kern) != string(kern.New) {
		t.Fatal("memory after the second apply does not hold both edits")
	}

	// Gone again, then reverted: the kernel function is restored.
	delete(mt.mods, "dummy")
	if jp := entry(); jp == nil || jp.State != StateModuleGone {
		t.Fatalf("after the second unload: %+v", jp)
	}
	rres, err := pt.Revert(ctx, d, p.ID)
	if err != nil {
		t.Fatalf("revert while the module is gone: %v", err)
	}
	if read(kern) != string(kern.Old) {
		t.Fatalf("revert left the kernel function patched (%s)", rres.Message)
	}
	if jp := entry(); jp != nil {
		t.Fatalf("journal after the revert: %+v", jp)
	}
	t.Log(rres.Message)
}
