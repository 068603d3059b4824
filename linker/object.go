// Package linker links an x86-64 ELF relocatable object (gcc -c) into
// code and data images for fixed guest-kernel addresses, resolving its
// undefined symbols against the guest's kallsyms.
//
// It is the part of function replacement that never touches a guest: the
// caller picks the addresses (the code area), supplies a symbol resolver and
// writes the resulting bytes.
package linker

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
)

// shtX86_64Unwind is SHT_X86_64_UNWIND (psABI), the type gas gives .eh_frame on x86-64.
const shtX86_64Unwind = elf.SectionType(0x70000001)

// Object is a parsed, validated x86-64 ET_REL ELF object.
type Object struct {
	name     string     // file name (or "object") for error messages
	sections []*section // sections that will be placed, in file order
	ignored  []IgnoredSection
	symbols  []symbol // indexed by ELF symbol index; 0 is the null symbol
	relocs   []reloc
	common   *section                   // synthetic section for SHN_COMMON symbols, nil if none
	special  map[string]*specialSection // processed kernel tables (special.go)
	// ignoredRefs are symbols referenced only from ignored sections'
	// relocations (objtool lists, ORC, ...): they need not resolve.
	ignoredRefs map[int]bool
}

type area int

const (
	areaText area = iota // executable: RX
	areaData             // everything else: RW+NX
)

func (a area) String() string {
	if a == areaText {
		return "text"
	}
	return "data"
}

// dataRank orders data sections: read-only data, then initialised data,
// then zero-filled, so that all bss can stay at the end of the image.
type dataRank int

const (
	rankReadOnly dataRank = iota
	rankWritable
	rankZero
)

type section struct {
	index  int // ELF section index (-1 for the synthetic COMMON section)
	name   string
	area   area
	rank   dataRank
	align  uint64
	size   uint64
	data   []byte // nil when nobits
	nobits bool
}

type symbol struct {
	name    string
	bind    elf.SymBind
	typ     elf.SymType
	shndx   elf.SectionIndex
	value   uint64 // offset in sec for defined symbols
	size    uint64
	sec     *section // placed section that defines it, nil otherwise
	skipped string   // name of an ignored section that defines it
}

type reloc struct {
	sec    *section
	off    uint64
	typ    elf.R_X86_64
	sym    int
	addend int64
}

// relocWidth gives the size in bytes of the field each supported type writes.
var relocWidth = map[elf.R_X86_64]int{
	elf.R_X86_64_NONE:  0,
	elf.R_X86_64_64:    8,
	elf.R_X86_64_PC64:  8,
	elf.R_X86_64_PC32:  4,
	elf.R_X86_64_PLT32: 4,
	elf.R_X86_64_32:    4,
	elf.R_X86_64_32S:   4,
}

// refusedSections names sections that carry instructions for the kernel's
// own boot-time or module-load processing. In a code area nothing processes
// them, so the code they describe would run unpatched or not at all.
var refusedSections = []struct{ prefix, reason string }{
	{".init_array", "constructors: nothing in the guest would run them"},
	{".fini_array", "destructors: nothing in the guest would run them"},
	{".preinit_array", "constructors: nothing in the guest would run them"},
	{".ctors", "constructors: nothing in the guest would run them"},
	{".dtors", "destructors: nothing in the guest would run them"},
	{".static_call", "static call trampolines belong to the kernel image"},
	{".altinstr", "alternatives section of a kind the linker does not process"},
	{".data..percpu", "per-CPU variables need a copy in every CPU's per-CPU area, which only the module loader creates"},
	{"__ksymtab", "symbol exports: a code area exports nothing"},
	{"__tracepoints", "tracepoints are registered only for the kernel and modules"},
	{"__param", "module parameters are registered only by the module loader"},
	{".gnu.linkonce.this_module", "this is a kernel module, not a replacement object"},
	{".kcfi_traps", "kCFI trap entries are processed only for the kernel and modules"},
	{".tm_clone_table", "transactional-memory tables: userspace only"},
}

// ignoredByName lists allocatable sections that are safe to leave out:
// nothing in the guest reads them.
var ignoredByName = map[string]string{
	".eh_frame":          "DWARF unwind tables: the kernel unwinds with ORC or frame pointers",
	".note.gnu.property": "ELF property note (CET markers) for program loaders",
}

// placeableNames are the plain sections gcc emits for C code; anything
// else allocatable is refused rather than guessed at.
var placeableNames = []string{".text", ".rodata", ".data", ".bss"}

// Load reads and validates an object file.
func Load(path string) (*Object, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("linker: %w", err)
	}
	return loadNamed(path, data)
}

// LoadBytes validates an object held in memory.
func LoadBytes(data []byte) (*Object, error) {
	return loadNamed("object", data)
}

func loadNamed(name string, data []byte) (*Object, error) {
	obj, errs := parse(name, data)
	if len(errs) > 0 {
		return nil, fmt.Errorf("linker: %s: %w", name, errors.Join(errs...))
	}
	return obj, nil
}

func parse(name string, data []byte) (*Object, []error) {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, []error{fmt.Errorf("not an ELF file: %w", err)}
	}
	switch {
	case f.Class != elf.ELFCLASS64:
		return nil, []error{fmt.Errorf("ELF class %v, want ELFCLASS64", f.Class)}
	case f.Data != elf.ELFDATA2LSB:
		return nil, []error{fmt.Errorf("ELF data %v, want little-endian", f.Data)}
	case f.Machine != elf.EM_X86_64:
		return nil, []error{fmt.Errorf("machine %v, want EM_X86_64", f.Machine)}
	case f.Type != elf.ET_REL:
		return nil, []error{fmt.Errorf("ELF type %v, want ET_REL (compile with -c)", f.Type)}
	}

	o := &Object{name: name}
	var errs []error
	byIndex := make(map[int]*section)
	skippedByIndex := make(map[int]string)
	specialByIndex := make(map[int]*specialSection)
	for i, s := range f.Sections {
		if isProcessed(s.Name) && s.Flags&elf.SHF_ALLOC != 0 && s.Type == elf.SHT_PROGBITS {
			data, err := s.Data()
			if err != nil {
				errs = append(errs, fmt.Errorf("section %s: reading contents: %w", s.Name, err))
				continue
			}
			if o.special == nil {
				o.special = make(map[string]*specialSection)
			}
			if o.special[s.Name] != nil {
				errs = append(errs, &SectionError{Section: s.Name, Reason: "appears twice"})
				continue
			}
			sp := &specialSection{name: s.Name, data: data, relocs: make(map[uint64]reloc)}
			o.special[s.Name] = sp
			specialByIndex[i] = sp
			continue
		}
		sec, ignoreReason, err := classify(i, s)
		switch {
		case err != nil:
			errs = append(errs, err)
		case sec != nil:
			byIndex[i] = sec
			o.sections = append(o.sections, sec)
		case ignoreReason != "":
			skippedByIndex[i] = s.Name
			o.ignored = append(o.ignored, IgnoredSection{Name: s.Name, Reason: ignoreReason})
		}
	}

	syms, err := f.Symbols()
	if err != nil {
		return nil, append(errs, fmt.Errorf("symbol table: %w", err))
	}
	// debug/elf drops the null symbol; keep ELF indices so relocations index directly.
	o.symbols = make([]symbol, len(syms)+1)
	for i, s := range syms {
		sym := symbol{
			name:  s.Name,
			bind:  elf.ST_BIND(s.Info),
			typ:   elf.ST_TYPE(s.Info),
			shndx: s.Section,
			value: s.Value,
			size:  s.Size,
		}
		switch {
		case sym.typ == elf.STT_TLS:
			errs = append(errs, &SymbolError{Symbol: s.Name, Reason: "thread-local storage has no meaning in the kernel"})
		case sym.typ == elf.STT_GNU_IFUNC:
			errs = append(errs, &SymbolError{Symbol: s.Name, Reason: "GNU indirect functions need a dynamic loader"})
		case s.Section == elf.SHN_UNDEF && s.Name != "" && sym.bind == elf.STB_WEAK:
			errs = append(errs, &SymbolError{Symbol: s.Name, Reason: "weak undefined symbol: ambiguous in a patch (0 or the kernel's?); declare it without __attribute__((weak))"})
		case s.Section == elf.SHN_COMMON:
			o.addCommon(&sym)
		case s.Section != elf.SHN_UNDEF && s.Section < elf.SHN_LORESERVE:
			if sec := byIndex[int(s.Section)]; sec != nil {
				sym.sec = sec
				if sym.typ == elf.STT_SECTION {
					sym.name = sec.name
				}
			} else if n, ok := skippedByIndex[int(s.Section)]; ok {
				sym.skipped = n
			} else if int(s.Section) < len(f.Sections) {
				sym.skipped = f.Sections[s.Section].Name
			}
		}
		o.symbols[i+1] = sym
	}

	for _, rs := range f.Sections {
		if rs.Type == elf.SHT_REL && byIndex[int(rs.Info)] != nil {
			errs = append(errs, fmt.Errorf("section %s: SHT_REL relocations (no addend) are not used on x86-64", rs.Name))
			continue
		}
		if rs.Type != elf.SHT_RELA {
			continue
		}
		if sp := specialByIndex[int(rs.Info)]; sp != nil {
			target := &section{index: int(rs.Info), name: sp.name, size: uint64(len(sp.data)), data: sp.data}
			rels, rerrs := o.parseRelocs(rs, target)
			errs = append(errs, rerrs...)
			for _, r := range rels {
				sp.relocs[r.off] = r
			}
			continue
		}
		target := byIndex[int(rs.Info)]
		if target == nil {
			o.noteIgnoredRefs(rs) // relocations of an ignored section (debug info, .eh_frame, objtool lists)
			continue
		}
		rels, rerrs := o.parseRelocs(rs, target)
		o.relocs = append(o.relocs, rels...)
		errs = append(errs, rerrs...)
	}
	errs = append(errs, o.checkSpecialSizes()...)
	if sp := o.special[secExTable]; sp != nil {
		errs = append(errs, o.checkExTable(sp)...)
	}
	return o, errs
}

// noteIgnoredRefs records the symbols an ignored section's relocations use.
func (o *Object) noteIgnoredRefs(rs *elf.Section) {
	data, err := rs.Data()
	if err != nil {
		return
	}
	if o.ignoredRefs == nil {
		o.ignoredRefs = make(map[int]bool)
	}
	for i := 0; i+24 <= len(data); i += 24 {
		o.ignoredRefs[int(binary.LittleEndian.Uint64(data[i+8:])>>32)] = true
	}
}

// classify decides whether a section is placed, ignored (with a reason) or refused.
func classify(index int, s *elf.Section) (*section, string, error) {
	switch s.Type {
	case elf.SHT_NULL, elf.SHT_SYMTAB, elf.SHT_STRTAB, elf.SHT_RELA, elf.SHT_REL, elf.SHT_GROUP, elf.SHT_SYMTAB_SHNDX:
		return nil, "", nil // ELF bookkeeping, consumed while parsing
	}
	if s.Flags&elf.SHF_ALLOC == 0 {
		return nil, "not allocated (comments, debug info, markers)", nil
	}
	if isProcessed(s.Name) {
		// parse reads the PROGBITS ones into Object.special
		return nil, "", &SectionError{Section: s.Name, Reason: fmt.Sprintf("section type %v, want PROGBITS", s.Type)}
	}
	for _, r := range ignoredSpecial {
		if s.Name == r.prefix || strings.HasPrefix(s.Name, r.prefix) {
			return nil, r.reason, nil
		}
	}
	for _, r := range refusedSections {
		if placedAsText[s.Name] {
			break
		}
		if s.Name == r.prefix || strings.HasPrefix(s.Name, r.prefix) {
			return nil, "", &SectionError{Section: s.Name, Reason: r.reason}
		}
	}
	if why, ok := ignoredByName[s.Name]; ok {
		return nil, why, nil
	}
	if s.Type == elf.SHT_NOTE {
		return nil, "note section: read only by program loaders", nil
	}
	if s.Type == shtX86_64Unwind {
		return nil, ignoredByName[".eh_frame"], nil
	}
	if s.Flags&elf.SHF_TLS != 0 {
		return nil, "", &SectionError{Section: s.Name, Reason: "thread-local storage has no meaning in the kernel"}
	}
	if s.Type != elf.SHT_PROGBITS && s.Type != elf.SHT_NOBITS {
		return nil, "", &SectionError{Section: s.Name, Reason: fmt.Sprintf("section type %v is neither PROGBITS nor NOBITS; nothing in the guest would process it", s.Type)}
	}
	exec := s.Flags&elf.SHF_EXECINSTR != 0
	if exec && s.Flags&elf.SHF_WRITE != 0 {
		return nil, "", &SectionError{Section: s.Name, Reason: "both writable and executable; the code area keeps W^X"}
	}
	base := plainName(s.Name)
	if placedAsText[s.Name] && exec {
		base = ".text"
	}
	if base == "" || exec != (base == ".text") {
		return nil, "", &SectionError{Section: s.Name, Reason: "not a plain .text*/.rodata*/.data*/.bss* section; the guest kernel would never process it, so it is refused rather than guessed at"}
	}
	sec := &section{index: index, name: s.Name, align: s.Addralign, size: s.Size, nobits: s.Type == elf.SHT_NOBITS}
	if sec.align == 0 {
		sec.align = 1
	}
	if sec.align&(sec.align-1) != 0 {
		return nil, "", &SectionError{Section: s.Name, Reason: fmt.Sprintf("alignment %d is not a power of two", sec.align)}
	}
	switch {
	case exec:
		sec.area = areaText
	case sec.nobits:
		sec.area, sec.rank = areaData, rankZero
	case s.Flags&elf.SHF_WRITE != 0:
		sec.area, sec.rank = areaData, rankWritable
	default:
		sec.area, sec.rank = areaData, rankReadOnly
	}
	if !sec.nobits {
		data, err := s.Data()
		if err != nil {
			return nil, "", fmt.Errorf("section %s: reading contents: %w", s.Name, err)
		}
		sec.data = data
	}
	return sec, "", nil
}

// plainName returns which of placeableNames a section name is (".rodata"
// for ".rodata.str1.1"), or "" if none.
func plainName(name string) string {
	for _, p := range placeableNames {
		if name == p || strings.HasPrefix(name, p+".") {
			return p
		}
	}
	return ""
}

// addCommon gives a COMMON symbol (a tentative definition without
// -fno-common) its own slot in a synthetic zero-filled section.
func (o *Object) addCommon(sym *symbol) {
	if o.common == nil {
		o.common = &section{index: -1, name: "COMMON", area: areaData, rank: rankZero, align: 1, nobits: true}
		o.sections = append(o.sections, o.common)
	}
	align := sym.value // for SHN_COMMON, st_value holds the alignment
	if align == 0 {
		align = 1
	}
	if align > o.common.align {
		o.common.align = align
	}
	off := alignUp(o.common.size, align)
	sym.value, sym.sec = off, o.common
	o.common.size = off + sym.size
}

func (o *Object) parseRelocs(rs *elf.Section, target *section) ([]reloc, []error) {
	data, err := rs.Data()
	if err != nil {
		return nil, []error{fmt.Errorf("section %s: reading relocations: %w", rs.Name, err)}
	}
	const entSize = 24 // Elf64_Rela
	if len(data)%entSize != 0 {
		return nil, []error{fmt.Errorf("section %s: size %d is not a multiple of %d", rs.Name, len(data), entSize)}
	}
	var errs []error
	var out []reloc
	for i := 0; i < len(data); i += entSize {
		info := binary.LittleEndian.Uint64(data[i+8:])
		r := reloc{
			sec:    target,
			off:    binary.LittleEndian.Uint64(data[i:]),
			typ:    elf.R_X86_64(info & 0xffffffff),
			sym:    int(info >> 32),
			addend: int64(binary.LittleEndian.Uint64(data[i+16:])),
		}
		if r.sym >= len(o.symbols) {
			errs = append(errs, o.relocError(r, fmt.Sprintf("symbol index %d out of range (%d symbols)", r.sym, len(o.symbols))))
			continue
		}
		width, ok := relocWidth[r.typ]
		if !ok {
			errs = append(errs, o.relocError(r, unsupportedHint(r.typ)))
			continue
		}
		if target.nobits {
			errs = append(errs, o.relocError(r, "relocation in a zero-filled (NOBITS) section"))
			continue
		}
		if r.off > target.size || uint64(width) > target.size-r.off {
			errs = append(errs, o.relocError(r, fmt.Sprintf("field of %d bytes at offset %#x is outside the section (size %#x)", width, r.off, target.size)))
			continue
		}
		if s := o.symbols[r.sym]; s.skipped != "" {
			errs = append(errs, o.relocError(r, fmt.Sprintf("symbol is defined in section %s, which is not loaded", s.skipped)))
			continue
		}
		if r.typ != elf.R_X86_64_NONE {
			out = append(out, r)
		}
	}
	return out, errs
}

func unsupportedHint(t elf.R_X86_64) string {
	switch t {
	case elf.R_X86_64_GOTPCREL, elf.R_X86_64_GOTPCRELX, elf.R_X86_64_REX_GOTPCRELX, elf.R_X86_64_GOT32,
		elf.R_X86_64_GOT64, elf.R_X86_64_GOTPC32, elf.R_X86_64_GOTOFF64, elf.R_X86_64_GOTPCREL64:
		return "unsupported relocation type (GOT access: compile with -fno-pic -fno-pie -mcmodel=kernel)"
	case elf.R_X86_64_TPOFF32, elf.R_X86_64_TPOFF64, elf.R_X86_64_DTPOFF32, elf.R_X86_64_DTPOFF64,
		elf.R_X86_64_TLSGD, elf.R_X86_64_TLSLD, elf.R_X86_64_GOTTPOFF:
		return "unsupported relocation type (thread-local storage)"
	}
	return "unsupported relocation type (supported: R_X86_64_64, PC64, PC32, PLT32, 32, 32S)"
}

func (o *Object) relocError(r reloc, reason string) *RelocError {
	name := ""
	if r.sym < len(o.symbols) {
		name = o.symbols[r.sym].name
	}
	return &RelocError{Section: r.sec.name, Offset: r.off, Type: r.typ, Symbol: name, Addend: r.addend, Reason: reason}
}

// Undefined lists, sorted, the names the object needs from the guest
// kernel. Names only ignored sections refer to are left out.
func (o *Object) Undefined() []string {
	used := make(map[int]bool)
	for _, r := range o.relocs {
		used[r.sym] = true
	}
	for _, sp := range o.special {
		for _, r := range sp.relocs {
			used[r.sym] = true
		}
	}
	seen := make(map[string]bool)
	var names []string
	for i, s := range o.symbols {
		if o.ignoredRefs[i] && !used[i] {
			continue
		}
		if s.shndx == elf.SHN_UNDEF && s.name != "" && !seen[s.name] {
			seen[s.name] = true
			names = append(names, s.name)
		}
	}
	sort.Strings(names)
	return names
}

// Align returns the alignment each area's base address must have: the
// largest alignment of the sections placed in it.
func (o *Object) Align() (text, data uint64) {
	text, data = 1, 1
	for _, s := range o.sections {
		if s.area == areaText {
			text = max(text, s.align)
		} else {
			data = max(data, s.align)
		}
	}
	return text, data
}

// Size returns the bytes each area needs (bss included in data), for bases
// aligned as Align requires, so a caller can allocate before linking.
func (o *Object) Size() (text, data uint64) {
	offs := o.offsets()
	for _, s := range o.sections {
		end := offs[s] + s.size
		if s.area == areaText {
			text = max(text, end)
		} else {
			data = max(data, end)
		}
	}
	return text, data
}

// offsets lays the sections out from offset 0 of their area: text in file
// order; data as read-only, writable, then zero-filled.
func (o *Object) offsets() map[*section]uint64 {
	offs := make(map[*section]uint64, len(o.sections))
	var textEnd, dataEnd uint64
	for _, s := range o.sections {
		if s.area == areaText {
			offs[s] = alignUp(textEnd, s.align)
			textEnd = offs[s] + s.size
		}
	}
	for rank := rankReadOnly; rank <= rankZero; rank++ {
		for _, s := range o.sections {
			if s.area == areaData && s.rank == rank {
				offs[s] = alignUp(dataEnd, s.align)
				dataEnd = offs[s] + s.size
			}
		}
	}
	return offs
}

func alignUp(v, align uint64) uint64 {
	return (v + align - 1) &^ (align - 1)
}
