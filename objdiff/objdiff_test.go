package objdiff

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/kobj"
	"github.com/hvpatch/hvpatch/linker"
	"github.com/hvpatch/hvpatch/symbols"
)

func load(t *testing.T, name string) (*kobj.File, []byte) {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	f, err := kobj.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return f, b
}

// fakeGuest is before.o "linked" the way a kernel image would hold it:
// each section at an address, relocations applied, the fentry calls
// turned into NOPs, and a kallsyms table.
type fakeGuest struct {
	mem  map[uint64][]byte // section base → bytes
	syms *symbols.Table
}

func (g *fakeGuest) Lookup(name string) []symbols.Symbol { return g.syms.Lookup(name) }

func (g *fakeGuest) ReadVirt(addr uint64, b []byte) error {
	for base, m := range g.mem {
		if addr >= base && addr+uint64(len(b)) <= base+uint64(len(m)) {
			copy(b, m[addr-base:])
			return nil
		}
	}
	return fmt.Errorf("no guest memory at %#x", addr)
}

const (
	printkAddr = 0xffffffff81f00000
	sleepAddr  = 0xffffffff81f00100
	otherCount = 0xffffffff83f00000 // another file's static "counter"
)

func newFakeGuest(t *testing.T, f *kobj.File) (*fakeGuest, map[string]uint64) {
	t.Helper()
	g := &fakeGuest{mem: map[uint64][]byte{}}
	base := map[*kobj.Section]uint64{}
	next := uint64(0xffffffff81000000)
	for _, s := range f.Sections {
		if s.Flags&elf.SHF_ALLOC == 0 {
			continue
		}
		base[s] = next
		b := make([]byte, s.Size)
		copy(b, s.Data)
		g.mem[next] = b
		next += 0x100000
	}
	ext := map[string]uint64{"printk": printkAddr, "__might_sleep": sleepAddr}
	for _, s := range f.Sections {
		if base[s] == 0 {
			continue
		}
		b := g.mem[base[s]]
		for _, r := range s.Relocs {
			if r.Sym.Name == "__fentry__" {
				copy(b[r.Offset-1:], FentryNop)
				continue
			}
			var S uint64
			if r.Sym.Section != nil {
				S = base[r.Sym.Section] + r.Sym.Value
			} else if a, ok := ext[r.Sym.Name]; ok {
				S = a
			} else {
				t.Fatalf("fixture needs %s", r.Sym.Name)
			}
			P := base[s] + r.Offset
			v := S + uint64(r.Addend)
			switch r.Type {
			case elf.R_X86_64_PC32, elf.R_X86_64_PLT32:
				binary.LittleEndian.PutUint32(b[r.Offset:], uint32(v-P))
			case elf.R_X86_64_32S, elf.R_X86_64_32:
				binary.LittleEndian.PutUint32(b[r.Offset:], uint32(v))
			case elf.R_X86_64_64:
				binary.LittleEndian.PutUint64(b[r.Offset:], v)
			}
		}
	}
	var syms []symbols.Symbol
	addrs := map[string]uint64{}
	for _, s := range f.Symbols {
		if s.Section == nil || base[s.Section] == 0 || s.Name == "" || s.Type == elf.STT_SECTION || s.Type == elf.STT_FILE {
			continue
		}
		typ := byte('t')
		switch {
		case s.Type == elf.STT_OBJECT && s.Section.Flags&elf.SHF_WRITE != 0:
			typ = 'b'
		case s.Type == elf.STT_OBJECT:
			typ = 'r'
		}
		if s.Bind == elf.STB_GLOBAL {
			typ -= 'a' - 'A'
		}
		a := base[s.Section] + s.Value
		addrs[s.Name] = a
		syms = append(syms, symbols.Symbol{Name: s.Name, Addr: a, Type: typ})
	}
	syms = append(syms, symbols.Symbol{Name: "printk", Addr: printkAddr, Type: 'T'},
		symbols.Symbol{Name: "__might_sleep", Addr: sleepAddr, Type: 'T'},
		symbols.Symbol{Name: "counter", Addr: otherCount, Type: 'b'})
	slices.SortFunc(syms, func(a, b symbols.Symbol) int {
		if a.Addr < b.Addr {
			return -1
		}
		if a.Addr > b.Addr {
			return 1
		}
		return 0
	})
	g.syms = symbols.NewTable(syms)
	return g, addrs
}

func TestVerify(t *testing.T) {
	before, _ := load(t, "before.o")
	g, addrs := newFakeGuest(t, before)
	m, err := Verify(before, g)
	if err != nil {
		t.Fatal(err)
	}
	if m.Verified != 4 || m.Funcs["checked"].Addr != addrs["checked"] {
		t.Fatalf("verified %d, checked at %#x (want %#x): %+v", m.Verified, m.Funcs["checked"].Addr, addrs["checked"], m)
	}
	// What the guest's code says about where statics live.
	if a, ok := m.AddrOf("counter"); !ok || a != addrs["counter"] {
		t.Fatalf("counter learnt at %#x %v, want %#x", a, ok, addrs["counter"])
	}
	if a, ok := m.AddrOf("names"); !ok || a != addrs["names"] {
		t.Fatalf("names learnt at %#x %v, want %#x", a, ok, addrs["names"])
	}

	// One changed byte in the guest: refused, naming function and offset.
	fn := addrs["checked"]
	for b, mem := range g.mem {
		if fn >= b && fn < b+uint64(len(mem)) {
			mem[fn-b+6] ^= 0xff
		}
	}
	_, err = Verify(before, g)
	var mm *MismatchError
	if !errors.As(err, &mm) || mm.Function != "checked" || mm.Offset != 6 || !strings.Contains(err.Error(), "checked") {
		t.Fatalf("got %v, want a mismatch in checked at +0x6", err)
	}
}

func TestDiff(t *testing.T) {
	before, _ := load(t, "before-fs.o")
	after, _ := load(t, "after-fs.o")
	c, err := Diff(before, after)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Changed, []string{"checked"}) || !slices.Equal(c.New, []string{"added"}) || !slices.Equal(c.LineOnly, []string{"sleeper"}) {
		t.Fatalf("changed %v new %v line-only %v; want [checked] [added] [sleeper]", c.Changed, c.New, c.LineOnly)
	}
	// The same object twice: nothing changed.
	if c, err := Diff(before, before); err != nil || len(c.Changed)+len(c.New)+len(c.LineOnly) != 0 {
		t.Fatalf("self diff: %+v %v", c, err)
	}
}

// verified loads the three fixtures and verifies the normal build against
// a fake guest made of it: what Extract starts from.
func verified(t *testing.T) (in Inputs, g *fakeGuest, addrs map[string]uint64) {
	t.Helper()
	normal, _ := load(t, "before.o")
	in.Before, _ = load(t, "before-fs.o")
	in.After, _ = load(t, "after-fs.o")
	g, addrs = newFakeGuest(t, normal)
	m, err := Verify(normal, g)
	if err != nil {
		t.Fatal(err)
	}
	in.Match, in.Guest = m, g
	return in, g, addrs
}

func TestExtract(t *testing.T) {
	in, g, addrs := verified(t)
	before, after := in.Before, in.After
	c, err := Diff(before, after)
	if err != nil {
		t.Fatal(err)
	}
	in.Change = c
	ex, err := Extract(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(ex.Replaces) != 1 || ex.Replaces[0].Function != "checked" || ex.Replaces[0].Addr != addrs["checked"] {
		t.Fatalf("replaces %+v", ex.Replaces)
	}
	// bump stays the guest's (unchanged static function); names is a
	// named read-only table the file had already: the guest's too.
	// Neither counter (not used by the new code) nor printk is needed.
	if !slices.Equal(ex.Imports, []string{"bump", "names"}) {
		t.Fatalf("imports %v, want [bump names]", ex.Imports)
	}
	out, err := kobj.Read(ex.Object)
	if err != nil {
		t.Fatal(err)
	}
	chk := out.Symbol("checked")
	if chk == nil || !chk.Defined() || out.Symbol("added") == nil || out.Symbol("sleeper") != nil || out.Symbol("stable") != nil {
		t.Fatalf("object defines the wrong functions")
	}
	code, _ := chk.Bytes()
	if string(code[:5]) != string(FentryNop) {
		t.Fatalf("fentry call not turned into a NOP: % x", code[:5])
	}
	// The linker takes it and resolves its imports from kallsyms.
	obj, err := linker.LoadBytes(ex.Object)
	if err != nil {
		t.Fatal(err)
	}
	img, err := obj.Link("checked", linker.Layout{TextBase: 0xffffffffa0000000, DataBase: 0xffffffffa0100000, TextLimit: 1 << 16, DataLimit: 1 << 16},
		func(name string) (uint64, bool) { a, err := g.syms.Addr(name); return a, err == nil })
	if err != nil {
		t.Fatal(err)
	}
	if img.Entry != 0xffffffffa0000000+chk.Value {
		t.Fatalf("entry %#x", img.Entry)
	}
}

// A static whose name several kallsyms entries share is named by its
// position: the guest code tells which entry it is.
func TestExtractSympos(t *testing.T) {
	in, _, addrs := verified(t)
	x := &extractor{in: in}
	name, err := x.guestName(in.After.Symbol("counter"))
	if err != nil {
		t.Fatal(err)
	}
	want := "counter,1"
	if addrs["counter"] > otherCount {
		want = "counter,2"
	}
	if name != want {
		t.Fatalf("counter named %q, want %q", name, want)
	}
}

func TestDiffRefusals(t *testing.T) {
	before, _ := load(t, "before-fs.o")
	after, _ := load(t, "after-fs.o")
	// Binding change: make checked local in the fixed object.
	after.Symbol("checked").Bind = elf.STB_LOCAL
	var r *Refusal
	if _, err := Diff(before, after); !errors.As(err, &r) || r.Function != "checked" || !strings.Contains(r.Reason, "binding") {
		t.Fatalf("binding change: %v", err)
	}
	after.Symbol("checked").Bind = elf.STB_GLOBAL
	// A changed function without its fentry call.
	sec := after.Symbol("checked").Section
	var keep []*kobj.Reloc
	for _, rl := range sec.Relocs {
		if rl.Sym.Name != "__fentry__" {
			keep = append(keep, rl)
		}
	}
	sec.Relocs = keep
	if _, err := Diff(before, after); !errors.As(err, &r) || r.Function != "checked" || !strings.Contains(r.Reason, "no fentry site") {
		t.Fatalf("no fentry: %v", err)
	}
	if got := callers(after, after.Symbol("bump")); !slices.Equal(got, []string{"added", "checked", "stable"}) { // added inlines checked
		t.Fatalf("callers of bump: %v", got)
	}
}
