package kobj

import (
	"debug/elf"
	"os"
	"testing"

	"github.com/hvpatch/hvpatch/linker"
)

func readSample(t *testing.T) (*File, []byte) {
	t.Helper()
	data, err := os.ReadFile("testdata/sample.o")
	if err != nil {
		t.Fatal(err)
	}
	f, err := Read(data)
	if err != nil {
		t.Fatal(err)
	}
	return f, data
}

func TestReadModel(t *testing.T) {
	f, _ := readSample(t)
	bump := f.Symbol("bump")
	if bump == nil || !bump.Defined() || bump.Type != elf.STT_FUNC || bump.Bind != elf.STB_LOCAL || bump.Section.Name != ".text.bump" {
		t.Fatalf("bump = %+v", bump)
	}
	entry := f.Section(".text.sample_entry")
	if entry == nil || len(entry.Relocs) != 4 {
		t.Fatalf(".text.sample_entry relocations: %+v", entry)
	}
	var callBump *Reloc
	for _, r := range entry.Relocs {
		if r.Sym != nil && r.Sym.Type == elf.STT_SECTION && r.Sym.Section.Name == ".text.bump" {
			callBump = r
		}
	}
	if callBump == nil || callBump.Type != elf.R_X86_64_PC32 || callBump.Addend != -4 {
		t.Fatalf("call to bump: %+v", callBump)
	}
	if p := f.Symbol("printk"); p == nil || p.Defined() {
		t.Fatalf("printk should be undefined: %+v", p)
	}
	b, err := f.Symbol("sample_entry").Bytes()
	if err != nil || len(b) != int(f.Symbol("sample_entry").Size) {
		t.Fatalf("Bytes: %d %v", len(b), err)
	}
	if len(f.Functions()) != 2 {
		t.Fatalf("functions: %d, want 2", len(f.Functions()))
	}
}

// Write must give an object that reads back to the same model and that
// other ELF consumers (debug/elf, hvpatch's linker) accept.
func TestWriteRoundTrip(t *testing.T) {
	f, _ := readSample(t)
	out, err := f.Write()
	if err != nil {
		t.Fatal(err)
	}
	g, err := Read(out)
	if err != nil {
		t.Fatalf("reading what Write wrote: %v", err)
	}
	if len(g.Sections) != len(f.Sections) || len(g.Symbols) != len(f.Symbols) {
		t.Fatalf("sections %d→%d, symbols %d→%d", len(f.Sections), len(g.Sections), len(f.Symbols), len(g.Symbols))
	}
	for i, s := range f.Sections {
		h := g.Sections[i]
		if s.Name != h.Name || s.Type != h.Type || s.Flags != h.Flags || s.Size != h.Size || string(s.Data) != string(h.Data) || len(s.Relocs) != len(h.Relocs) {
			t.Errorf("section %s differs after the round trip", s.Name)
			continue
		}
		for j, r := range s.Relocs {
			q := h.Relocs[j]
			if r.Offset != q.Offset || r.Type != q.Type || r.Addend != q.Addend || (r.Sym == nil) != (q.Sym == nil) || (r.Sym != nil && r.Sym.Name != q.Sym.Name) {
				t.Errorf("%s relocation %d: %+v vs %+v", s.Name, j, r, q)
			}
		}
	}
	if _, err := elf.NewFile(bytesReader(out)); err != nil {
		t.Fatal(err)
	}
	obj, err := linker.LoadBytes(out)
	if err != nil {
		t.Fatalf("the linker refuses the written object: %v", err)
	}
	if und := obj.Undefined(); len(und) != 1 || und[0] != "printk" {
		t.Fatalf("undefined: %v", und)
	}
}

// A dropped section and a symbol turned undefined are what build does.
func TestWriteFiltered(t *testing.T) {
	f, _ := readSample(t)
	bump := f.Section(".text.bump")
	var keep []*Section
	for _, s := range f.Sections {
		if s != bump {
			keep = append(keep, s)
		}
	}
	f.Sections = keep
	sym := f.Symbol("bump")
	sym.Section, sym.Shndx, sym.Bind, sym.Type, sym.Value, sym.Size = nil, elf.SHN_UNDEF, elf.STB_GLOBAL, elf.STT_NOTYPE, 0, 0
	sym.Name = "bump,2"
	var syms []*Symbol
	for _, s := range f.Symbols {
		if s.Section == bump && s.Type == elf.STT_SECTION {
			continue
		}
		syms = append(syms, s)
	}
	f.Symbols = syms
	for _, r := range f.Section(".text.sample_entry").Relocs {
		if r.Sym != nil && r.Sym.Section == bump {
			r.Sym = sym
		}
	}
	out, err := f.Write()
	if err != nil {
		t.Fatal(err)
	}
	g, err := Read(out)
	if err != nil {
		t.Fatal(err)
	}
	if s := g.Symbol("bump,2"); s == nil || s.Defined() {
		t.Fatalf("bump,2: %+v", s)
	}
	// Errors: a relocation naming a symbol that is not in the file.
	f.Symbols = f.Symbols[:0]
	if _, err := f.Write(); err == nil {
		t.Fatal("Write accepted a relocation against a missing symbol")
	}
}

func TestReadRejects(t *testing.T) {
	_, data := readSample(t)
	for name, b := range map[string][]byte{
		"empty":     nil,
		"truncated": data[:100],
		"not elf":   []byte("hello, world, this is not an object file at all......................................"),
	} {
		if _, err := Read(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
