package symbols

import (
	"bytes"
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
