package linker

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
)

// Resolver gives the guest address of a kernel symbol (from kallsyms);
// ok is false when the guest has no such symbol.
type Resolver func(name string) (addr uint64, ok bool)

// Layout says where the code area will put the object.
type Layout struct {
	TextBase  uint64 // virtual address of the executable (RX) image
	DataBase  uint64 // virtual address of the data (RW+NX) image: rodata, data, bss
	TextLimit uint64 // bytes available at TextBase
	DataLimit uint64 // bytes available at DataBase
}

// Options adapt the link to the guest kernel's state: how it returns, which
// static keys are on, which CPU features it saw. The link finishes the code
// as the guest kernel finished its own at boot (special.go), so one object
// serves every guest of the same build.
type Options struct {
	// PlainReturns turns every `jmp __x86_return_thunk` into
	// `ret; int3; int3; int3; int3`, as the kernel does to its own return
	// sites at boot when no return-thunk mitigation is active. Without it
	// the jump goes to whatever the resolver gives for __x86_return_thunk.
	PlainReturns bool

	// KeyEnabled says whether the struct static_key at keyAddr (a guest
	// address) is enabled: static_key_enabled(), i.e. its atomic_t enabled
	// (offset 0) > 0. Needed when the object has a __jump_table. Each site
	// gets a jmp or a NOP as jump_label_type() decides; the choice is
	// frozen: a later flip of the key in the guest does not reach the code
	// area, whose sites are in none of the kernel's jump tables.
	KeyEnabled func(keyAddr uint64) (bool, error)

	// CPUFeature says whether boot_cpu_has(bit) in the guest: bit is an
	// X86_FEATURE_* number, or X86_BUG_* (after the feature words of the
	// same x86_capability array). Needed when the object has .altinstructions.
	CPUFeature func(bit uint16) (bool, error)

	// AltLayout is the size of struct alt_instr: AltLayout61 (12 bytes,
	// Linux 6.1), AltLayout612 (14 bytes, 6.3 and later) or AltLayoutAuto
	// (told apart by the section's size and relocation offsets).
	AltLayout int

	// ReadGuest reads guest memory and Resolve gives a kernel symbol's
	// address; runtime constants (runtime_ptr_*, runtime_shift_*) take
	// their values from the guest's variables through them.
	ReadGuest func(addr uint64, b []byte) error
	Resolve   Resolver
}

// ReturnThunk is the symbol gcc's -mfunction-return=thunk-extern jumps to
// instead of emitting `ret`.
const ReturnThunk = "__x86_return_thunk"

// Image is a linked object: bytes for each area and a description of them.
type Image struct {
	Text  []byte // to be written at Layout.TextBase
	Data  []byte // to be written at Layout.DataBase; bss included, zero-filled
	Entry uint64 // guest address of the entry symbol
	Map   LinkMap
}

// Link places the object at lay, resolves its undefined symbols with
// resolve and applies every relocation.
func (o *Object) Link(entry string, lay Layout, resolve Resolver) (*Image, error) {
	return o.LinkWithOptions(entry, lay, resolve, Options{})
}

// LinkWithOptions is Link with options.
func (o *Object) LinkWithOptions(entry string, lay Layout, resolve Resolver, opt Options) (*Image, error) {
	img, errs := o.link(entry, lay, resolve, opt)
	if len(errs) > 0 {
		return nil, fmt.Errorf("linker: %s: %w", o.name, errors.Join(errs...))
	}
	return img, nil
}

func (o *Object) link(entry string, lay Layout, resolve Resolver, opt Options) (*Image, []error) {
	var errs []error
	textSize, dataSize := o.Size()
	textAlign, dataAlign := o.Align()
	if textSize > 0 && lay.TextBase%textAlign != 0 {
		errs = append(errs, fmt.Errorf("text base %#x is not aligned to %d, as its sections require", lay.TextBase, textAlign))
	}
	if dataSize > 0 && lay.DataBase%dataAlign != 0 {
		errs = append(errs, fmt.Errorf("data base %#x is not aligned to %d, as its sections require", lay.DataBase, dataAlign))
	}
	if textSize > lay.TextLimit {
		errs = append(errs, &SizeError{Area: "text", Need: textSize, Limit: lay.TextLimit, Sections: o.sectionNames(areaText)})
	}
	if dataSize > lay.DataLimit {
		errs = append(errs, &SizeError{Area: "data", Need: dataSize, Limit: lay.DataLimit, Sections: o.sectionNames(areaData)})
	}
	if textSize > 0 && dataSize > 0 && lay.TextBase < lay.DataBase+dataSize && lay.DataBase < lay.TextBase+textSize {
		errs = append(errs, fmt.Errorf("text [%#x, %#x) and data [%#x, %#x) overlap", lay.TextBase, lay.TextBase+textSize, lay.DataBase, lay.DataBase+dataSize))
	}

	imports, err := o.resolveImports(resolve, opt)
	if err != nil {
		errs = append(errs, err)
	}
	entrySym, err := o.findEntry(entry)
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, errs
	}

	img := &Image{Text: make([]byte, textSize), Data: make([]byte, dataSize)}
	// int3 between text sections: a stray jump into padding traps at once.
	for i := range img.Text {
		img.Text[i] = 0xcc
	}
	offs := o.offsets()
	addr := make(map[*section]uint64, len(o.sections))
	m := &img.Map
	*m = LinkMap{Entry: entry, TextBase: lay.TextBase, TextSize: textSize, TextLimit: lay.TextLimit,
		DataBase: lay.DataBase, DataSize: dataSize, DataLimit: lay.DataLimit, Ignored: o.ignored}
	for _, s := range o.sections {
		base, buf := lay.DataBase, img.Data
		if s.area == areaText {
			base, buf = lay.TextBase, img.Text
		}
		addr[s] = base + offs[s]
		copy(buf[offs[s]:], s.data)
		if s.size == 0 {
			continue // gcc's empty .data/.bss: nothing to show
		}
		m.Sections = append(m.Sections, PlacedSection{Name: s.name, Area: s.area.String(), Addr: addr[s], Size: s.size, Align: s.align, ZeroFilled: s.nobits})
	}
	sort.SliceStable(m.Sections, func(i, j int) bool { return m.Sections[i].Addr < m.Sections[j].Addr })

	for _, r := range o.relocs {
		base, buf := lay.DataBase, img.Data
		if r.sec.area == areaText {
			base, buf = lay.TextBase, img.Text
		}
		applied, err := o.apply(r, addr[r.sec]-base+r.off, addr[r.sec]+r.off, buf, addr, imports, opt)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		m.Relocations = append(m.Relocations, applied)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	sort.SliceStable(m.Relocations, func(i, j int) bool { return m.Relocations[i].Addr < m.Relocations[j].Addr })

	ctx := &specialCtx{o: o, img: img, offs: offs, addr: addr, imports: imports, opt: opt}
	if errs := ctx.process(); len(errs) > 0 {
		return nil, errs
	}
	for _, ig := range m.Ignored {
		if strings.HasPrefix(ig.Name, ".static_call_sites") {
			m.Notes = append(m.Notes, "static calls go through the kernel's __SCT__* trampolines, which follow static_call_update() in the guest")
		}
	}

	img.Entry = addr[entrySym.sec] + entrySym.value
	m.EntryAddr = img.Entry
	m.Symbols = o.definedSymbols(addr)
	for _, name := range o.Undefined() {
		if a, ok := imports[name]; ok {
			m.Imports = append(m.Imports, ImportedSymbol{Name: name, Addr: a})
		}
	}
	return img, nil
}

// resolveImports asks the resolver for every undefined name and reports
// all missing ones at once.
func (o *Object) resolveImports(resolve Resolver, opt Options) (map[string]uint64, error) {
	imports := make(map[string]uint64)
	var missing []string
	for _, name := range o.Undefined() {
		if opt.PlainReturns && name == ReturnThunk {
			continue // every use becomes a ret; apply refuses any other use
		}
		if resolve == nil {
			missing = append(missing, name)
			continue
		}
		if a, ok := resolve(name); ok {
			imports[name] = a
		} else {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return imports, &UnresolvedError{Names: missing}
	}
	return imports, nil
}

func (o *Object) findEntry(name string) (*symbol, error) {
	var global *symbol
	var locals []*symbol
	for i := range o.symbols {
		s := &o.symbols[i]
		if s.name != name || s.typ == elf.STT_SECTION {
			continue
		}
		if s.shndx == elf.SHN_UNDEF {
			return nil, &SymbolError{Symbol: name, Reason: "entry symbol is not defined in the object, only referenced"}
		}
		if s.sec == nil || s.sec.area != areaText {
			return nil, &SymbolError{Symbol: name, Reason: "entry symbol is not in an executable section"}
		}
		if s.bind == elf.STB_LOCAL {
			locals = append(locals, s)
		} else {
			global = s
		}
	}
	switch {
	case global != nil:
		return global, nil
	case len(locals) == 1:
		return locals[0], nil
	case len(locals) > 1:
		return nil, &SymbolError{Symbol: name, Reason: fmt.Sprintf("entry symbol is ambiguous: %d local definitions", len(locals))}
	}
	return nil, &SymbolError{Symbol: name, Reason: "entry symbol not found in the object"}
}

// apply computes and writes one relocation; off indexes buf, place is the
// guest address of the field.
func (o *Object) apply(r reloc, off, place uint64, buf []byte, addr map[*section]uint64, imports map[string]uint64, opt Options) (AppliedReloc, error) {
	sym := o.symbols[r.sym]
	applied := AppliedReloc{Section: r.sec.name, Offset: r.off, Addr: place, Type: r.typ.String(), Symbol: sym.name, Addend: r.addend, Width: relocWidth[r.typ]}

	if opt.PlainReturns && sym.shndx == elf.SHN_UNDEF && sym.name == ReturnThunk {
		if err := o.plainReturn(r, off, buf); err != nil {
			return applied, err
		}
		applied.Note = "jmp to return thunk rewritten as ret"
		return applied, nil
	}

	var S uint64
	switch {
	case r.sym == 0:
	case sym.sec != nil:
		S = addr[sym.sec] + sym.value
	case sym.shndx == elf.SHN_ABS:
		S = sym.value
	case sym.shndx == elf.SHN_UNDEF:
		S = imports[sym.name]
	default:
		return applied, o.relocError(r, fmt.Sprintf("symbol in section index %d, which has no address", sym.shndx))
	}
	applied.Target = S
	A := uint64(r.addend)
	var v uint64
	switch r.typ {
	case elf.R_X86_64_64:
		v = S + A
	case elf.R_X86_64_PC64:
		v = S + A - place
	case elf.R_X86_64_PC32, elf.R_X86_64_PLT32:
		// No PLT in a code area: PLT32 calls the symbol directly.
		v = S + A - place
		if d := int64(v); d < math.MinInt32 || d > math.MaxInt32 {
			return applied, o.relocError(r, fmt.Sprintf("target %#x is %d bytes (%s) from %#x: does not fit a signed 32-bit displacement", S, d, human(d), place))
		}
	case elf.R_X86_64_32:
		v = S + A
		if v > math.MaxUint32 {
			return applied, o.relocError(r, fmt.Sprintf("value %#x does not fit 32 bits zero-extended", v))
		}
	case elf.R_X86_64_32S:
		v = S + A
		if d := int64(v); d < math.MinInt32 || d > math.MaxInt32 {
			return applied, o.relocError(r, fmt.Sprintf("value %#x does not fit 32 bits sign-extended (-mcmodel=kernel needs addresses in the top 2 GiB)", v))
		}
	}
	switch applied.Width {
	case 8:
		binary.LittleEndian.PutUint64(buf[off:], v)
		applied.Value = v
	case 4:
		binary.LittleEndian.PutUint32(buf[off:], uint32(v))
		applied.Value = uint64(uint32(v))
	}
	return applied, nil
}

// plainReturn rewrites `jmp rel32` to the return thunk into `ret` plus int3
// padding: the same five bytes, one instruction boundary kept.
func (o *Object) plainReturn(r reloc, off uint64, buf []byte) error {
	switch {
	case r.sec.area != areaText:
		return o.relocError(r, "return thunk referenced from data; cannot turn it into a ret")
	case (r.typ != elf.R_X86_64_PC32 && r.typ != elf.R_X86_64_PLT32) || r.addend != -4:
		return o.relocError(r, "return thunk referenced other than by a jmp rel32; cannot turn it into a ret")
	case off >= 2 && buf[off-2] == 0x0f && buf[off-1]&0xf0 == 0x80:
		return o.relocError(r, "conditional jump to the return thunk; cannot turn it into a ret")
	case off < 1 || buf[off-1] != 0xe9:
		return o.relocError(r, "return thunk referenced other than by a jmp rel32; cannot turn it into a ret")
	}
	copy(buf[off-1:], []byte{0xc3, 0xcc, 0xcc, 0xcc, 0xcc})
	return nil
}

func (o *Object) sectionNames(a area) []string {
	var names []string
	for _, s := range o.sections {
		if s.area == a && s.size > 0 {
			names = append(names, fmt.Sprintf("%s (%#x)", s.name, s.size))
		}
	}
	return names
}

func (o *Object) definedSymbols(addr map[*section]uint64) []DefinedSymbol {
	var out []DefinedSymbol
	for _, s := range o.symbols {
		if s.sec == nil || s.name == "" || s.typ == elf.STT_SECTION || s.typ == elf.STT_FILE {
			continue
		}
		out = append(out, DefinedSymbol{Name: s.name, Addr: addr[s.sec] + s.value, Size: s.size,
			Section: s.sec.name, Global: s.bind != elf.STB_LOCAL, Type: symType(s.typ)})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	return out
}

func symType(t elf.SymType) string {
	switch t {
	case elf.STT_FUNC:
		return "func"
	case elf.STT_OBJECT:
		return "object"
	}
	return "notype"
}

// human renders a distance in the unit that makes a rel32 overflow obvious.
func human(d int64) string {
	f := math.Abs(float64(d))
	switch {
	case f >= 1<<30:
		return fmt.Sprintf("%.1f GiB", f/(1<<30))
	case f >= 1<<20:
		return fmt.Sprintf("%.1f MiB", f/(1<<20))
	}
	return fmt.Sprintf("%.0f bytes", f)
}
