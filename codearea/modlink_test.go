package codearea

import (
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/symbols"
)

// LinkForModuleSymbol: the module function's return style is read from
// its own code (sized from the module's table, the last function of a
// module up to its next symbol); names the module defines resolve to the
// module's symbols (statics, "NAME,N" in the module's address order) even
// where the kernel has the same name, other names to the kernel image,
// then to another module's exports.
func TestLinkForModuleSymbol(t *testing.T) {
	k, m := newFixture()
	const mod = fxText + 0x20000 // stands in for module memory: mapped like the image
	// dummy_change_carrier: endbr64, fentry NOP, mov eax,-1, jmp to a return thunk.
	code := []byte{0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0xb8, 0xff, 0xff, 0xff, 0xff}
	thunk := uint64(fxText + 0x10200)
	jmp, err := JumpTo(mod+uint64(len(code)), thunk)
	if err != nil {
		t.Fatal(err)
	}
	copy(m.b[fxImagePA+0x20000:], append(code, jmp...))
	k.Symbols = symbols.NewTable(append(k.Symbols.All(), symbols.Symbol{Name: "its_return_thunk", Addr: thunk, Type: 'T'}))
	mods := []symbols.Symbol{
		{Name: "helper", Addr: mod - 0x200, Type: 't', Module: "dummy"},
		{Name: "helper", Addr: mod - 0x100, Type: 't', Module: "dummy"},
		{Name: "seq_printf", Addr: mod - 0x80, Type: 't', Module: "dummy"}, // shadows the kernel's
		{Name: "dummy_change_carrier", Addr: mod, Type: 't', Module: "dummy"},
		{Name: "dummy_state", Addr: mod + 0x1000, Type: 'd', Module: "dummy"},
		{Name: "other_export", Addr: fxText + 0x30000, Type: 'T', Module: "other"},
		{Name: "other_static", Addr: fxText + 0x30100, Type: 't', Module: "other"},
		{Name: "helper", Addr: fxText + 0x30200, Type: 'T', Module: "other"},
	}
	sym := mods[3]
	opt, resolve, err := LinkForModuleSymbol(k, mods, "dummy", sym)
	if err != nil {
		t.Fatal(err)
	}
	if opt.PlainReturns {
		t.Fatal("plain returns, want the return thunk")
	}
	for name, want := range map[string]uint64{
		"__x86_return_thunk": thunk,
		"helper,1":           mod - 0x200,
		"helper,2":           mod - 0x100,
		"seq_printf":         mod - 0x80,
		"dummy_state":        mod + 0x1000,
		"init_uts_ns":        fxText + 0x11000, // the kernel's
		"version_proc_show":  fxText + 0x10000,
		"other_export":       fxText + 0x30000, // exported by another module
	} {
		if got, ok := resolve(name); !ok || got != want {
			t.Errorf("resolve(%q) = %#x, %v; want %#x", name, got, ok, want)
		}
	}
	for _, name := range []string{
		"helper",       // two in the module: ambiguous, never the other module's
		"helper,3",     // the module has two
		"other_static", // not exported
		"no_such_symbol",
	} {
		if got, ok := resolve(name); ok {
			t.Errorf("resolve(%q) = %#x, want unresolved", name, got)
		}
	}
	if _, _, err := LinkForModuleSymbol(k, mods, "other", sym); err == nil || !strings.Contains(err.Error(), "not a symbol of module other") {
		t.Errorf("symbol of another module: %v", err)
	}
	// The kernel-image resolver keeps its convention.
	if _, r, err := LinkFor(k, "version_proc_show"); err != nil {
		t.Fatal(err)
	} else if _, ok := r("dummy_state"); ok {
		t.Error("the kernel resolver found a module symbol")
	}
}

func TestSplitNth(t *testing.T) {
	for in, want := range map[string]struct {
		base string
		n    int
	}{
		"f": {"f", 0}, "f,2": {"f", 2}, "f,0": {"f,0", 0}, "f,+1": {"f,+1", 0}, ",1": {",1", 0}, "f,": {"f,", 0}, "a,b,3": {"a,b", 3},
	} {
		if b, n := splitNth(in); b != want.base || n != want.n {
			t.Errorf("splitNth(%q) = %q, %d; want %q, %d", in, b, n, want.base, want.n)
		}
	}
}
