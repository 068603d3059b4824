package symbols

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

// A small kernel-like table: a per-CPU symbol, two static functions of the
// same name, an alias pair at one address, data after the text.
func smallTable() []Symbol {
	return []Symbol{
		{Name: "data_after", Addr: 0xffffffff81002000, Type: 'D'},
		{Name: "fixed_percpu_data", Addr: 0, Type: 'A'},
		{Name: "_text", Addr: 0xffffffff81000000, Type: 'T'},
		{Name: "startup_64", Addr: 0xffffffff81000000, Type: 'T'},
		{Name: "helper", Addr: 0xffffffff81000100, Type: 't'},
		{Name: "global_fn", Addr: 0xffffffff81000140, Type: 'T'},
		{Name: "local_data", Addr: 0xffffffff81000150, Type: 'd'},
		{Name: "helper", Addr: 0xffffffff81000400, Type: 't'},
		{Name: "weak_fn", Addr: 0xffffffff81000480, Type: 'W'},
		{Name: "mod_fn", Addr: 0xffffffffc0001000, Type: 't', Module: "e1000"},
	}
}

func TestNewTableSortsAndKeepsTieOrder(t *testing.T) {
	in := smallTable()
	tab := NewTable(in)
	if tab.Len() != len(in) {
		t.Fatalf("Len = %d, want %d", tab.Len(), len(in))
	}
	all := tab.All()
	for i := 1; i < len(all); i++ {
		if all[i].Addr < all[i-1].Addr {
			t.Fatalf("All()[%d] %#x below All()[%d] %#x", i, all[i].Addr, i-1, all[i-1].Addr)
		}
	}
	// _text came before startup_64 in the input: it must stay first.
	if all[1].Name != "_text" || all[2].Name != "startup_64" {
		t.Errorf("tie order lost: %q, %q", all[1].Name, all[2].Name)
	}
	// The caller's slice is not reordered.
	if in[0].Name != "data_after" {
		t.Errorf("NewTable modified its argument: first is %q", in[0].Name)
	}
}

func TestLookupAndAddr(t *testing.T) {
	tab := NewTable(smallTable())
	dups := tab.Lookup("helper")
	if len(dups) != 2 || dups[0].Addr != 0xffffffff81000100 || dups[1].Addr != 0xffffffff81000400 {
		t.Fatalf("Lookup(helper) = %+v, want both statics in address order", dups)
	}
	if got := tab.Lookup("nope"); got != nil {
		t.Errorf("Lookup(nope) = %+v", got)
	}
	a, err := tab.Addr("global_fn")
	if err != nil || a != 0xffffffff81000140 {
		t.Errorf("Addr(global_fn) = %#x, %v", a, err)
	}
	_, err = tab.Addr("helper")
	if err == nil || !strings.Contains(err.Error(), "ambiguous") ||
		!strings.Contains(err.Error(), "0xffffffff81000100") || !strings.Contains(err.Error(), "0xffffffff81000400") {
		t.Errorf("Addr(helper) error = %v, want ambiguity listing both addresses", err)
	}
	_, err = tab.Addr("no_such_symbol")
	if err == nil || !strings.Contains(err.Error(), `"no_such_symbol"`) {
		t.Errorf("Addr(no_such_symbol) error = %v, want it to name the symbol", err)
	}
	if mods := tab.Lookup("mod_fn"); len(mods) != 1 || mods[0].Module != "e1000" {
		t.Errorf("Lookup(mod_fn) = %+v", mods)
	}
}

func TestResolveBoundaries(t *testing.T) {
	tab := NewTable(smallTable())
	cases := []struct {
		addr uint64
		name string
		off  uint64
		ok   bool
	}{
		{0, "fixed_percpu_data", 0, true},
		{0xffffffff81000000, "_text", 0, true}, // first of the aliases, like the kernel
		{0xffffffff810000ff, "_text", 0xff, true},
		{0xffffffff81000100, "helper", 0, true},
		{0xffffffff8100013f, "helper", 0x3f, true},
		{0xffffffff81000140, "global_fn", 0, true},
		{0xffffffff81000401, "helper", 1, true},
		{0xffffffffc0001000, "mod_fn", 0, true}, // exactly the last symbol
		{0xffffffffc0001001, "", 0, false},      // past the last symbol
	}
	for _, c := range cases {
		s, off, ok := tab.Resolve(c.addr)
		if ok != c.ok || s.Name != c.name || off != c.off {
			t.Errorf("Resolve(%#x) = %q+%#x %v, want %q+%#x %v", c.addr, s.Name, off, ok, c.name, c.off, c.ok)
		}
	}
	empty := NewTable(nil)
	if _, _, ok := empty.Resolve(0x1000); ok {
		t.Errorf("Resolve on an empty table succeeded")
	}
	// Below the lowest symbol.
	tab2 := NewTable([]Symbol{{Name: "a", Addr: 0x1000, Type: 'T'}, {Name: "b", Addr: 0x2000, Type: 'T'}})
	if s, _, ok := tab2.Resolve(0xfff); ok {
		t.Errorf("Resolve below the first symbol gave %q", s.Name)
	}
}

func TestFunctionSize(t *testing.T) {
	tab := NewTable(smallTable())
	size := func(name string, i int) uint64 { return tab.FunctionSize(tab.Lookup(name)[i]) }
	// helper@0x100 -> next text global_fn@0x140.
	if got := size("helper", 0); got != 0x40 {
		t.Errorf("FunctionSize(helper#0) = %#x, want 0x40", got)
	}
	// global_fn@0x140 -> local_data@0x150 is data, skipped; next text helper@0x400.
	if got := size("global_fn", 0); got != 0x2c0 {
		t.Errorf("FunctionSize(global_fn) = %#x, want 0x2c0", got)
	}
	// _text and startup_64 share an address: the next text symbol is higher.
	if got := size("startup_64", 0); got != 0x100 {
		t.Errorf("FunctionSize(startup_64) = %#x, want 0x100", got)
	}
	// weak_fn@0x480: next text is the module symbol.
	if got := size("weak_fn", 0); got != 0xffffffffc0001000-0xffffffff81000480 {
		t.Errorf("FunctionSize(weak_fn) = %#x", got)
	}
	if got := size("mod_fn", 0); got != 0 {
		t.Errorf("FunctionSize(last) = %#x, want 0", got)
	}
}

func TestWithSlideLeavesAbsolute(t *testing.T) {
	tab := NewTable(smallTable())
	var slide uint64 = 0x3a000000
	moved := tab.WithSlide(slide)
	for i, s := range moved.All() {
		orig := tab.All()[i]
		want := orig.Addr + slide
		if orig.Type == 'A' {
			want = orig.Addr
		}
		if s.Addr != want || s.Name != orig.Name {
			t.Errorf("%s: %#x after slide, want %#x", s.Name, s.Addr, want)
		}
	}
	back := moved.WithSlide(-slide)
	if !equalSyms(back.All(), tab.All()) {
		t.Errorf("sliding back does not restore the table")
	}
}

func TestWriteKallsymsFormat(t *testing.T) {
	tab := NewTable(smallTable())
	var b bytes.Buffer
	if err := tab.WriteKallsyms(&b); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != tab.Len() {
		t.Fatalf("%d lines for %d symbols", len(lines), tab.Len())
	}
	if lines[0] != "0000000000000000 A fixed_percpu_data" {
		t.Errorf("line 1 = %q", lines[0])
	}
	if last := lines[len(lines)-1]; last != "ffffffffc0001000 t mod_fn\t[e1000]" {
		t.Errorf("last line = %q", last)
	}
}

func equalSyms(a, b []Symbol) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestWithSlideView: a slid table shares the original's symbols when the
// order holds, answers like a copy would, and falls back to a copy when
// moving the addresses would reorder them.
func TestWithSlideView(t *testing.T) {
	base := NewTable([]Symbol{
		{Name: "percpu_a", Addr: 0x10, Type: 'A'},
		{Name: "_text", Addr: 0xffffffff81000000, Type: 'T'},
		{Name: "f", Addr: 0xffffffff81000010, Type: 't'},
		{Name: "f_alias", Addr: 0xffffffff81000010, Type: 'T'},
		{Name: "data", Addr: 0xffffffff81000040, Type: 'D'},
		{Name: "g", Addr: 0xffffffff81000080, Type: 'T'},
		{Name: "f", Addr: 0xffffffff810000c0, Type: 't'},
	})
	minus := func(v uint64) uint64 { return -v }
	for _, slide := range []uint64{0x3a000000, minus(0x1000000)} {
		view := base.WithSlide(slide)
		if view.base != base {
			t.Fatalf("slide %#x: not a view", slide)
		}
		cp := copySlid(base, slide)
		if view.Len() != cp.Len() || !slices.Equal(view.All(), cp.All()) {
			t.Fatalf("slide %#x: view %v, copy %v", slide, view.All(), cp.All())
		}
		for _, s := range cp.All() {
			for _, d := range []uint64{0, 1, 0x20} {
				v1, o1, ok1 := view.Resolve(s.Addr + d)
				v2, o2, ok2 := cp.Resolve(s.Addr + d)
				if v1 != v2 || o1 != o2 || ok1 != ok2 {
					t.Errorf("Resolve(%#x): view %v+%#x %v, copy %v+%#x %v", s.Addr+d, v1, o1, ok1, v2, o2, ok2)
				}
			}
			if !slices.Equal(view.Lookup(s.Name), cp.Lookup(s.Name)) {
				t.Errorf("Lookup(%s): view %v copy %v", s.Name, view.Lookup(s.Name), cp.Lookup(s.Name))
			}
			if view.FunctionSize(s) != cp.FunctionSize(s) {
				t.Errorf("FunctionSize(%s): view %d copy %d", s.Name, view.FunctionSize(s), cp.FunctionSize(s))
			}
		}
		var b1, b2 strings.Builder
		view.WriteKallsyms(&b1)
		cp.WriteKallsyms(&b2)
		if b1.String() != b2.String() {
			t.Errorf("WriteKallsyms differs:\n%s\n%s", b1.String(), b2.String())
		}
		// A view of a view slides from the original.
		back := view.WithSlide(-slide)
		if back.base != base || !slices.Equal(back.All(), base.All()) {
			t.Errorf("slide back: %v", back.All())
		}
	}
	// Moving an address past an absolute symbol reorders: a copy.
	low := NewTable([]Symbol{{Name: "abs", Addr: 0x1000, Type: 'A'}, {Name: "x", Addr: 0x2000, Type: 'T'}})
	moved := low.WithSlide(minus(0x1800))
	if moved.base != nil {
		t.Fatal("reordering slide gave a view")
	}
	if a, _ := moved.Addr("x"); a != 0x800 {
		t.Errorf("x at %#x", a)
	}
	if moved.All()[0].Name != "x" {
		t.Errorf("copy not sorted: %v", moved.All())
	}
}
