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
	mods map[string][]Symbol
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
