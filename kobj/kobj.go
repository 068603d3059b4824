// Package kobj reads an x86-64 ELF relocatable object (a kernel .o) into a
// model that can be inspected, filtered and written back as a new object.
//
// hvpatch build uses it to cut the changed functions out of a compiled
// kernel object: the model keeps sections, symbols and relocations linked by
// pointers, so dropping a section or renaming a symbol needs no index
// bookkeeping until Write lays the file out again. It is deliberately
// small: no program headers, no groups beyond what the kernel uses, no
// dynamic linking.
package kobj

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
)

// File is one relocatable object.
type File struct {
	Sections []*Section // content sections in file order (no symtab/strtab/rela)
	Symbols  []*Symbol  // in file order, without the null symbol
}

// Section is one content section with the relocations that apply to it.
type Section struct {
	Name      string
	Type      elf.SectionType
	Flags     elf.SectionFlag
	Addralign uint64
	Entsize   uint64
	Size      uint64
	Data      []byte // nil for SHT_NOBITS
	Relocs    []*Reloc
	// Index is the section's index in the file it was read from (0 for
	// sections made by the caller); diagnostics only.
	Index int
}

// Symbol is one symbol-table entry.
type Symbol struct {
	Name    string
	Bind    elf.SymBind
	Type    elf.SymType
	Other   uint8
	Section *Section // nil when undefined, absolute or common
	Shndx   elf.SectionIndex
	Value   uint64
	Size    uint64
}

// Defined reports whether the symbol lives in one of the file's sections.
func (s *Symbol) Defined() bool { return s.Section != nil }

// Reloc is one RELA relocation.
type Reloc struct {
	Offset uint64
	Type   elf.R_X86_64
	Sym    *Symbol // nil for relocations against the null symbol
	Addend int64
}

// Limits for objects read from disk: a kernel .o is a few MiB at most.
const (
	maxObjectSize = 256 << 20
	maxSections   = 1 << 20
)

// Read parses an x86-64 ET_REL object.
func Read(data []byte) (*File, error) {
	if len(data) > maxObjectSize {
		return nil, fmt.Errorf("kobj: object of %d bytes is larger than any kernel object", len(data))
	}
	ef, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("kobj: %w", err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Data != elf.ELFDATA2LSB || ef.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("kobj: not an x86-64 little-endian ELF64 object (%v %v %v)", ef.Class, ef.Data, ef.Machine)
	}
	if ef.Type != elf.ET_REL {
		return nil, fmt.Errorf("kobj: ELF type %v, want a relocatable object (ET_REL)", ef.Type)
	}
	if len(ef.Sections) > maxSections {
		return nil, fmt.Errorf("kobj: %d sections", len(ef.Sections))
	}
	f := &File{}
	byIndex := make([]*Section, len(ef.Sections))
	for i, es := range ef.Sections {
		switch es.Type {
		case elf.SHT_NULL, elf.SHT_SYMTAB, elf.SHT_STRTAB, elf.SHT_RELA, elf.SHT_REL, elf.SHT_GROUP, elf.SHT_SYMTAB_SHNDX:
			continue
		}
		s := &Section{Name: es.Name, Type: es.Type, Flags: es.Flags, Addralign: es.Addralign, Entsize: es.Entsize, Size: es.Size, Index: i}
		if es.Type != elf.SHT_NOBITS {
			if s.Data, err = es.Data(); err != nil {
				return nil, fmt.Errorf("kobj: section %s: %w", es.Name, err)
			}
		}
		byIndex[i] = s
		f.Sections = append(f.Sections, s)
	}
	esyms, err := ef.Symbols()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return nil, fmt.Errorf("kobj: symbols: %w", err)
	}
	// debug/elf drops the null symbol: ELF index i is esyms[i-1].
	syms := make([]*Symbol, len(esyms)+1)
	for i, es := range esyms {
		s := &Symbol{Name: es.Name, Bind: elf.ST_BIND(es.Info), Type: elf.ST_TYPE(es.Info), Other: es.Other,
			Shndx: es.Section, Value: es.Value, Size: es.Size}
		if es.Section > elf.SHN_UNDEF && es.Section < elf.SHN_LORESERVE {
			if int(es.Section) >= len(byIndex) || byIndex[es.Section] == nil {
				return nil, fmt.Errorf("kobj: symbol %q in section index %d, which holds no content", es.Name, es.Section)
			}
			s.Section = byIndex[es.Section]
			if s.Type == elf.STT_SECTION && s.Name == "" {
				s.Name = s.Section.Name
			}
		}
		syms[i+1] = s
		f.Symbols = append(f.Symbols, s)
	}
	for _, es := range ef.Sections {
		if es.Type == elf.SHT_REL {
			return nil, fmt.Errorf("kobj: section %s: REL relocations are not used on x86-64", es.Name)
		}
		if es.Type != elf.SHT_RELA {
			continue
		}
		if int(es.Info) >= len(byIndex) || byIndex[es.Info] == nil {
			continue // relocations for a section we do not model (debug info of a group, etc.)
		}
		target := byIndex[es.Info]
		raw, err := es.Data()
		if err != nil {
			return nil, fmt.Errorf("kobj: section %s: %w", es.Name, err)
		}
		if len(raw)%24 != 0 {
			return nil, fmt.Errorf("kobj: section %s: size %d is not a whole number of RELA entries", es.Name, len(raw))
		}
		for off := 0; off < len(raw); off += 24 {
			info := binary.LittleEndian.Uint64(raw[off+8:])
			si := int(info >> 32)
			if si >= len(syms) {
				return nil, fmt.Errorf("kobj: section %s: relocation %d names symbol %d of %d", es.Name, off/24, si, len(syms)-1)
			}
			r := &Reloc{Offset: binary.LittleEndian.Uint64(raw[off:]), Type: elf.R_X86_64(uint32(info)),
				Sym: syms[si], Addend: int64(binary.LittleEndian.Uint64(raw[off+16:]))}
			if r.Offset >= target.Size {
				return nil, fmt.Errorf("kobj: section %s: relocation at %#x is past the end of %s (%#x)", es.Name, r.Offset, target.Name, target.Size)
			}
			target.Relocs = append(target.Relocs, r)
		}
	}
	return f, nil
}

// Section finds a section by name (the first, when several share it).
func (f *File) Section(name string) *Section {
	for _, s := range f.Sections {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// Symbol finds a non-section symbol by name, preferring a defined one.
func (f *File) Symbol(name string) *Symbol {
	var undef *Symbol
	for _, s := range f.Symbols {
		if s.Name != name || s.Type == elf.STT_SECTION {
			continue
		}
		if s.Defined() {
			return s
		}
		undef = s
	}
	return undef
}

// SymbolsIn lists the named symbols defined in sec (no section or file
// symbols), in file order.
func (f *File) SymbolsIn(sec *Section) []*Symbol {
	var out []*Symbol
	for _, s := range f.Symbols {
		if s.Section == sec && s.Type != elf.STT_SECTION && s.Type != elf.STT_FILE && s.Name != "" {
			out = append(out, s)
		}
	}
	return out
}

// Functions lists the defined function symbols.
func (f *File) Functions() []*Symbol {
	var out []*Symbol
	for _, s := range f.Symbols {
		if s.Type == elf.STT_FUNC && s.Defined() {
			out = append(out, s)
		}
	}
	return out
}

// Bytes returns the size bytes of the symbol's section at its value, or an
// error when they are not all there.
func (s *Symbol) Bytes() ([]byte, error) {
	sec := s.Section
	if sec == nil {
		return nil, fmt.Errorf("kobj: symbol %s is not defined here", s.Name)
	}
	if sec.Data == nil {
		return nil, fmt.Errorf("kobj: symbol %s is in %s, which has no file bytes", s.Name, sec.Name)
	}
	end := s.Value + s.Size
	if end < s.Value || end > uint64(len(sec.Data)) {
		return nil, fmt.Errorf("kobj: symbol %s [%#x, %#x) lies outside %s (%#x bytes)", s.Name, s.Value, end, sec.Name, len(sec.Data))
	}
	return sec.Data[s.Value:end], nil
}

// RelocsIn returns sec's relocations with offsets in [lo, hi).
func (sec *Section) RelocsIn(lo, hi uint64) []*Reloc {
	var out []*Reloc
	for _, r := range sec.Relocs {
		if r.Offset >= lo && r.Offset < hi {
			out = append(out, r)
		}
	}
	return out
}

// RelocWidth is the number of bytes a relocation of type t writes, 0 for
// types hvpatch does not expect in kernel objects.
func RelocWidth(t elf.R_X86_64) int {
	switch t {
	case elf.R_X86_64_64, elf.R_X86_64_PC64:
		return 8
	case elf.R_X86_64_PC32, elf.R_X86_64_PLT32, elf.R_X86_64_32, elf.R_X86_64_32S, elf.R_X86_64_GOTPCREL,
		elf.R_X86_64_GOTPCRELX, elf.R_X86_64_REX_GOTPCRELX:
		return 4
	}
	return 0
}
