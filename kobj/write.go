package kobj

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"sort"
)

// Write lays the object out as a new ELF file: the content sections in
// order, a .rela section for each that has relocations, then .symtab,
// .strtab and .shstrtab. Local symbols are written before global ones, as
// ELF requires; every symbol a relocation names must be in f.Symbols, and
// every section a symbol names must be in f.Sections.
func (f *File) Write() ([]byte, error) {
	secIndex := map[*Section]int{}
	for i, s := range f.Sections {
		if _, dup := secIndex[s]; dup {
			return nil, fmt.Errorf("kobj: section %s listed twice", s.Name)
		}
		secIndex[s] = i + 1 // 0 is the null section
	}
	// Symbol order: null, locals (file order), globals (file order).
	ordered := make([]*Symbol, 0, len(f.Symbols))
	for _, s := range f.Symbols {
		if s.Bind == elf.STB_LOCAL {
			ordered = append(ordered, s)
		}
	}
	firstGlobal := len(ordered) + 1
	for _, s := range f.Symbols {
		if s.Bind != elf.STB_LOCAL {
			ordered = append(ordered, s)
		}
	}
	symIndex := map[*Symbol]int{}
	for i, s := range ordered {
		symIndex[s] = i + 1
	}

	strtab := newStrtab()
	var symtab bytes.Buffer
	symtab.Write(make([]byte, 24)) // null symbol
	for _, s := range ordered {
		shndx := s.Shndx
		if s.Section != nil {
			i, ok := secIndex[s.Section]
			if !ok {
				return nil, fmt.Errorf("kobj: symbol %s is in section %s, which is not in the file", s.Name, s.Section.Name)
			}
			shndx = elf.SectionIndex(i)
		} else if shndx > elf.SHN_UNDEF && shndx < elf.SHN_LORESERVE {
			return nil, fmt.Errorf("kobj: symbol %s names section index %d but no section", s.Name, shndx)
		}
		name := uint32(0)
		if s.Type != elf.STT_SECTION {
			name = strtab.add(s.Name)
		}
		var e [24]byte
		binary.LittleEndian.PutUint32(e[0:], name)
		e[4] = elf.ST_INFO(s.Bind, s.Type)
		e[5] = s.Other
		binary.LittleEndian.PutUint16(e[6:], uint16(shndx))
		binary.LittleEndian.PutUint64(e[8:], s.Value)
		binary.LittleEndian.PutUint64(e[16:], s.Size)
		symtab.Write(e[:])
	}

	type out struct {
		name      string
		typ       elf.SectionType
		flags     elf.SectionFlag
		data      []byte
		size      uint64
		link      uint32
		info      uint32
		addralign uint64
		entsize   uint64
	}
	var secs []out
	for _, s := range f.Sections {
		size := s.Size
		if s.Data != nil {
			size = uint64(len(s.Data))
		}
		secs = append(secs, out{name: s.Name, typ: s.Type, flags: s.Flags, data: s.Data, size: size, addralign: s.Addralign, entsize: s.Entsize})
	}
	var symtabIndex uint32 // set once the sections are laid out
	for _, s := range f.Sections {
		if len(s.Relocs) == 0 {
			continue
		}
		rs := append([]*Reloc(nil), s.Relocs...)
		sort.SliceStable(rs, func(i, j int) bool { return rs[i].Offset < rs[j].Offset })
		var b bytes.Buffer
		for _, r := range rs {
			si := 0
			if r.Sym != nil {
				var ok bool
				if si, ok = symIndex[r.Sym]; !ok {
					return nil, fmt.Errorf("kobj: a relocation in %s at %#x names symbol %s, which is not in the file", s.Name, r.Offset, r.Sym.Name)
				}
			}
			if r.Offset >= s.Size {
				return nil, fmt.Errorf("kobj: relocation at %#x is past the end of %s", r.Offset, s.Name)
			}
			var e [24]byte
			binary.LittleEndian.PutUint64(e[0:], r.Offset)
			binary.LittleEndian.PutUint64(e[8:], uint64(si)<<32|uint64(r.Type))
			binary.LittleEndian.PutUint64(e[16:], uint64(r.Addend))
			b.Write(e[:])
		}
		secs = append(secs, out{name: ".rela" + s.Name, typ: elf.SHT_RELA, flags: elf.SHF_INFO_LINK, data: b.Bytes(),
			size: uint64(b.Len()), link: 0 /* set below */, info: uint32(secIndex[s]), addralign: 8, entsize: 24})
	}
	symtabIndex = uint32(len(secs) + 1)
	for i := range secs {
		if secs[i].typ == elf.SHT_RELA {
			secs[i].link = symtabIndex
		}
	}
	secs = append(secs,
		out{name: ".symtab", typ: elf.SHT_SYMTAB, data: symtab.Bytes(), size: uint64(symtab.Len()), link: symtabIndex + 1, info: uint32(firstGlobal), addralign: 8, entsize: 24},
		out{name: ".strtab", typ: elf.SHT_STRTAB, data: strtab.bytes(), size: uint64(len(strtab.bytes())), addralign: 1},
	)
	shstr := newStrtab()
	names := make([]uint32, len(secs))
	for i := range secs {
		names[i] = shstr.add(secs[i].name)
	}
	shstrName := shstr.add(".shstrtab")
	secs = append(secs, out{name: ".shstrtab", typ: elf.SHT_STRTAB, data: shstr.bytes(), size: uint64(len(shstr.bytes())), addralign: 1})
	names = append(names, shstrName)

	// Layout: header, section contents (aligned), section header table.
	var body bytes.Buffer
	body.Write(make([]byte, 64))
	offsets := make([]uint64, len(secs))
	for i, s := range secs {
		if s.typ == elf.SHT_NOBITS {
			offsets[i] = uint64(body.Len())
			continue
		}
		align := max(s.addralign, 1)
		for uint64(body.Len())%align != 0 {
			body.WriteByte(0)
		}
		offsets[i] = uint64(body.Len())
		body.Write(s.data)
	}
	for body.Len()%8 != 0 {
		body.WriteByte(0)
	}
	shoff := uint64(body.Len())
	body.Write(make([]byte, 64)) // null section header
	for i, s := range secs {
		var h [64]byte
		binary.LittleEndian.PutUint32(h[0:], names[i])
		binary.LittleEndian.PutUint32(h[4:], uint32(s.typ))
		binary.LittleEndian.PutUint64(h[8:], uint64(s.flags))
		binary.LittleEndian.PutUint64(h[24:], offsets[i])
		binary.LittleEndian.PutUint64(h[32:], s.size)
		binary.LittleEndian.PutUint32(h[40:], s.link)
		binary.LittleEndian.PutUint32(h[44:], s.info)
		binary.LittleEndian.PutUint64(h[48:], s.addralign)
		binary.LittleEndian.PutUint64(h[56:], s.entsize)
		body.Write(h[:])
	}
	b := body.Bytes()
	copy(b[0:], []byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT), byte(elf.ELFOSABI_NONE)})
	binary.LittleEndian.PutUint16(b[16:], uint16(elf.ET_REL))
	binary.LittleEndian.PutUint16(b[18:], uint16(elf.EM_X86_64))
	binary.LittleEndian.PutUint32(b[20:], uint32(elf.EV_CURRENT))
	binary.LittleEndian.PutUint64(b[40:], shoff)
	binary.LittleEndian.PutUint16(b[52:], 64) // e_ehsize
	binary.LittleEndian.PutUint16(b[58:], 64) // e_shentsize
	binary.LittleEndian.PutUint16(b[60:], uint16(len(secs)+1))
	binary.LittleEndian.PutUint16(b[62:], uint16(len(secs))) // .shstrtab is last
	return b, nil
}

type strtab struct {
	buf   bytes.Buffer
	index map[string]uint32
}

func newStrtab() *strtab {
	t := &strtab{index: map[string]uint32{}}
	t.buf.WriteByte(0)
	return t
}

func (t *strtab) add(s string) uint32 {
	if s == "" {
		return 0
	}
	if i, ok := t.index[s]; ok {
		return i
	}
	i := uint32(t.buf.Len())
	t.buf.WriteString(s)
	t.buf.WriteByte(0)
	t.index[s] = i
	return i
}

func (t *strtab) bytes() []byte { return t.buf.Bytes() }
