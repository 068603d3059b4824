package objdiff

import (
	"debug/elf"
	"fmt"
	"sort"
	"strings"

	"github.com/hvpatch/hvpatch/kobj"
	"github.com/hvpatch/hvpatch/symbols"
)

// FentryNop is the 5-byte NOP the kernel leaves at every ftrace site.
var FentryNop = []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}

// Inputs of Extract.
type Inputs struct {
	Before *kobj.File // compiled before the fix, -ffunction-sections (Diff's before)
	After  *kobj.File // compiled after the fix, -ffunction-sections
	Change *Change
	Match  *Match // Verify of the normal compile before the fix
	Guest  Guest
}

// Extracted is the object of new code and what it replaces.
type Extracted struct {
	Object   []byte
	Replaces []Replace // one per changed function: its guest copy jumps to the new one
	Notes    []string  // what was dropped or decided, for the build report
	Imports  []string  // kallsyms names the object needs from the guest
}

// Replace is one function to redirect.
type Replace struct {
	Function string // name in the guest's kallsyms
	Sympos   int    // 0 when unique, else its position among same-named entries
	With     string // the defining symbol in the object
	Addr     uint64 // the guest copy's address (at build time)
}

// Extract writes an object holding the changed and new functions of After,
// the read-only data and strings they use, and the kernel special-section
// entries that describe their code. Every other symbol they use becomes an
// undefined name that resolves in the guest's kallsyms: "name" when the
// guest has one entry of that name, "name,N" for the N-th of several.
func Extract(in Inputs) (*Extracted, error) {
	x := &extractor{in: in, include: map[*kobj.Section]bool{}, ext: map[*kobj.Symbol]*kobj.Symbol{}, byName: map[string]*kobj.Symbol{}}
	return x.run()
}

type extractor struct {
	in      Inputs
	include map[*kobj.Section]bool
	// ext maps an After symbol used but not included to the undefined
	// symbol standing for it in the output.
	ext    map[*kobj.Symbol]*kobj.Symbol
	byName map[string]*kobj.Symbol
	// retarget maps section-symbol relocations to the symbol they mean.
	notes []string
	out   Extracted
}

func (x *extractor) run() (*Extracted, error) {
	after := x.in.After
	afterFuncs := funcsByName(after)
	var todo []*kobj.Section
	add := func(s *kobj.Section) {
		if !x.include[s] {
			x.include[s] = true
			todo = append(todo, s)
		}
	}
	for _, name := range append(append([]string(nil), x.in.Change.Changed...), x.in.Change.New...) {
		fn := afterFuncs[name]
		if fn == nil {
			return nil, fmt.Errorf("function %s is not in the fixed object", name)
		}
		if fn.Value != 0 && !(fn.Value == 16 && after.Symbol("__pfx_"+name) != nil && after.Symbol("__pfx_"+name).Section == fn.Section) {
			return nil, fmt.Errorf("function %s does not have a section of its own (compile with -ffunction-sections)", name)
		}
		add(fn.Section)
	}
	for _, name := range x.in.Change.Changed {
		g, ok := x.in.Match.Funcs[name]
		if !ok {
			return nil, &Refusal{Function: name, Reason: "its copy in the guest could not be identified (not verified: " + strings.Join(x.in.Match.Skipped, "; ") + ")"}
		}
		if g.Copies > 1 {
			return nil, &Refusal{Function: name, Reason: fmt.Sprintf("the guest has %d identical copies of it (from several files); which one this file's callers use cannot be told", g.Copies)}
		}
		pos := 0
		if g.Count > 1 {
			pos = g.Sympos
		}
		x.out.Replaces = append(x.out.Replaces, Replace{Function: name, Sympos: pos, With: name, Addr: g.Addr})
	}
	// Follow relocations from included code to decide, for every target,
	// whether it comes along or stays the guest's.
	for len(todo) > 0 {
		s := todo[0]
		todo = todo[1:]
		for _, r := range s.Relocs {
			if err := x.follow(s, r, add); err != nil {
				return nil, err
			}
		}
	}
	specials, err := x.specialSections(add)
	if err != nil {
		return nil, err
	}
	for len(todo) > 0 { // .altinstr_replacement and strings the entries use
		s := todo[0]
		todo = todo[1:]
		for _, r := range s.Relocs {
			if err := x.follow(s, r, add); err != nil {
				return nil, err
			}
		}
	}
	return x.write(specials)
}

// follow decides one relocation's target. A relocation against a section
// symbol is first turned into one against the symbol it means.
func (x *extractor) follow(from *kobj.Section, r *kobj.Reloc, add func(*kobj.Section)) error {
	sym := r.Sym
	if sym == nil {
		return nil
	}
	if sym.Name == "__fentry__" {
		return nil // turned into a NOP when written
	}
	if sym.Type == elf.STT_SECTION {
		sec := sym.Section
		if sec == nil {
			return fmt.Errorf("relocation in %s at %#x against a section symbol with no section", from.Name, r.Offset)
		}
		if x.include[sec] {
			return nil
		}
		if x.copyable(sec) {
			add(sec)
			return nil
		}
		target := meant(x.in.After, r)
		if target == nil {
			return fmt.Errorf("code in %s refers to %s%+#x, which holds %d symbols; cannot tell which one the guest has", from.Name, sec.Name, r.Addend, len(x.in.After.SymbolsIn(sec)))
		}
		if isText(sec) && strings.Contains(target.Name, ".cold") {
			add(sec) // the cold part of a function that comes along
			return nil
		}
		return x.external(target, from)
	}
	if !sym.Defined() {
		return x.external(sym, from)
	}
	if x.include[sym.Section] {
		return nil
	}
	if isText(sym.Section) && strings.Contains(sym.Name, ".cold") {
		add(sym.Section)
		return nil
	}
	if x.copyable(sym.Section) {
		add(sym.Section)
		return nil
	}
	return x.external(sym, from)
}

// copyable reports sections whose content can be copied with the new
// code: strings, constants and other read-only data nothing takes the
// address of for identity (nothing writes them, so a copy is the same
// thing). A named read-only object the unpatched file had already (an
// operations table, say) stays the guest's: code may compare pointers to it.
func (x *extractor) copyable(s *kobj.Section) bool {
	if isText(s) || specialOf(s.Name) != nil || ignoredSection(s) || s.Flags&elf.SHF_WRITE != 0 {
		return false
	}
	named := soleSymbol(x.in.After.SymbolsIn(s))
	if named == nil || lineSuffix.MatchString(named.Name) {
		return true
	}
	_, existed := dataByName(x.in.Before)[named.Name]
	return !existed
}

func soleSymbol(syms []*kobj.Symbol) *kobj.Symbol {
	var out *kobj.Symbol
	for _, s := range syms {
		if s.Value == 0 {
			if out != nil {
				return nil
			}
			out = s
		}
	}
	return out
}

// external makes sym a guest symbol: the undefined symbol of the output
// that stands for it, named so that the guest's kallsyms resolves it to
// the very copy this object's unpatched build uses.
func (x *extractor) external(sym *kobj.Symbol, from *kobj.Section) error {
	if _, ok := x.ext[sym]; ok {
		return nil
	}
	name, err := x.guestName(sym)
	if err != nil {
		return fmt.Errorf("code in %s uses %s: %w", from.Name, sym.Name, err)
	}
	u := x.byName[name]
	if u == nil {
		u = &kobj.Symbol{Name: name, Bind: elf.STB_GLOBAL, Type: elf.STT_NOTYPE, Shndx: elf.SHN_UNDEF}
		x.byName[name] = u
		x.out.Imports = append(x.out.Imports, name)
	}
	x.ext[sym] = u
	return nil
}

// guestName finds the kallsyms reference for a symbol of the After object.
func (x *extractor) guestName(sym *kobj.Symbol) (string, error) {
	all := x.in.Guest.Lookup(sym.Name)
	if !sym.Defined() || sym.Bind != elf.STB_LOCAL {
		// Global: one definition in the whole kernel.
		switch globals := globalSymbols(all); {
		case len(all) == 1:
			return sym.Name, nil
		case len(globals) == 1:
			return symRef(sym.Name, sympos(all, globals[0].Addr), len(all)), nil
		case len(all) == 0:
			return "", fmt.Errorf("the guest's kallsyms has no %s", sym.Name)
		default:
			return "", fmt.Errorf("the guest's kallsyms has %d entries called %s and none is the only global one", len(all), sym.Name)
		}
	}
	if sym.Section != nil && sym.Section.Flags&elf.SHF_WRITE != 0 && !isText(sym.Section) {
		if _, existed := dataByName(x.in.Before)[sym.Name]; !existed && !lineSuffix.MatchString(sym.Name) {
			return "", &Refusal{Function: sym.Name, Reason: "the fix adds writable static data; a hot patch cannot add state to the running kernel"}
		}
	}
	// A static of this file: find the guest copy the unpatched code uses.
	name := sym.Name
	if lineSuffix.MatchString(name) {
		var err error
		if name, err = x.correlate(sym); err != nil {
			return "", err
		}
	}
	addr, ok := x.in.Match.AddrOf(name)
	if !ok {
		if len(all) == 1 && name == sym.Name {
			return sym.Name, nil
		}
		return "", fmt.Errorf("static %s: no verified function of the unpatched object refers to it, and the guest has %d entries of that name", name, len(x.in.Guest.Lookup(name)))
	}
	all = x.in.Guest.Lookup(name)
	if pos := sympos(all, addr); pos > 0 {
		return symRef(name, pos, len(all)), nil
	}
	return "", fmt.Errorf("static %s is at %#x in the guest (from its code), but kallsyms has no %s there", name, addr, name)
}

func globalSymbols(syms []symbols.Symbol) []symbols.Symbol {
	var out []symbols.Symbol
	for _, s := range syms {
		if s.Type >= 'A' && s.Type <= 'Z' {
			out = append(out, s)
		}
	}
	return out
}

// correlate maps a numbered function-local static of the fixed object
// (_rs.12) to its name in the unpatched object: gcc numbers them in order
// of appearance, so the number can move. The static is identified by the
// function that uses it, which must use exactly one static of that base
// name in both builds.
func (x *extractor) correlate(sym *kobj.Symbol) (string, error) {
	base := lineSuffix.ReplaceAllString(sym.Name, "")
	users := usersOf(x.in.After, sym)
	if len(users) == 0 {
		return "", fmt.Errorf("static %s: no function uses it", sym.Name)
	}
	before := funcsByName(x.in.Before)
	var found string
	for _, u := range users {
		a := usesWithBase(x.in.After, funcsByName(x.in.After)[u], base)
		b := usesWithBase(x.in.Before, before[u], base)
		if len(a) != 1 || len(b) != 1 {
			continue
		}
		if found != "" && found != b[0] {
			return "", fmt.Errorf("static %s matches both %s and %s of the unpatched build", sym.Name, found, b[0])
		}
		found = b[0]
	}
	if found == "" {
		return "", &Refusal{Function: sym.Name, Reason: "a function-local static whose counterpart in the running kernel cannot be told (its users " + strings.Join(users, ", ") + " use several of that name or are new)"}
	}
	return found, nil
}

// usersOf lists the functions referring to sym.
func usersOf(f *kobj.File, sym *kobj.Symbol) []string {
	seen := map[string]bool{}
	for _, s := range f.Sections {
		if !isText(s) {
			continue
		}
		for _, r := range s.Relocs {
			if r.Sym == sym || (r.Sym != nil && r.Sym.Type == elf.STT_SECTION && sym.Section != nil && r.Sym.Section == sym.Section) {
				if u := symbolAt(f, s, int64(r.Offset)); u != nil {
					seen[u.Name] = true
				}
			}
		}
	}
	return sortedKeys(seen)
}

// usesWithBase lists the statics named base.N that fn refers to.
func usesWithBase(f *kobj.File, fn *kobj.Symbol, base string) []string {
	if fn == nil {
		return nil
	}
	seen := map[string]bool{}
	for _, r := range fn.Section.RelocsIn(fn.Value, fn.Value+fn.Size) {
		if r.Sym == nil {
			continue
		}
		s := r.Sym
		if s.Type == elf.STT_SECTION && s.Section != nil {
			s = soleSymbol(f.SymbolsIn(s.Section))
			if s == nil {
				continue
			}
		}
		if lineSuffix.ReplaceAllString(s.Name, "") == base && lineSuffix.MatchString(s.Name) {
			seen[s.Name] = true
		}
	}
	return sortedKeys(seen)
}

// specialSections keeps, of each special section, the entries that
// describe included code, and notes the ones it drops.
func (x *extractor) specialSections(add func(*kobj.Section)) ([]*kobj.Section, error) {
	var out []*kobj.Section
	for _, s := range x.in.After.Sections {
		sp := specialOf(s.Name)
		if sp == nil {
			if x.include[s] || ignoredSection(s) || s.Name == ".altinstr_replacement" || ordinarySection(s) {
				continue // callers and tables keep using the old entry, which jumps to the new code
			}
			// An unknown section that points into included code would be
			// silently lost: refuse.
			for _, r := range s.Relocs {
				if t, _ := codeTarget(r, true); t != nil && x.include[t] && isText(t) {
					return nil, &Refusal{Reason: fmt.Sprintf("section %s refers to the new code and hvpatch does not know what the kernel does with it", s.Name)}
				}
			}
			continue
		}
		size, ok := entrySize(sp, s)
		if !ok {
			return nil, fmt.Errorf("section %s: size %d does not fit the entry layout hvpatch knows", s.Name, s.Size)
		}
		var keep []uint64
		for i := uint64(0); i < s.Size/size; i++ {
			r := siteReloc(s, size, i)
			if r == nil {
				continue
			}
			if t, _ := codeTarget(r, true); t != nil && x.include[t] {
				keep = append(keep, i)
			}
		}
		if len(keep) == 0 {
			continue
		}
		if s.Name == "__ex_table" {
			t, off := codeTarget(siteReloc(s, size, keep[0]), true)
			where := t.Name
			if fn := symbolAt(x.in.After, t, off); fn != nil {
				where = fmt.Sprintf("%s+%#x", fn.Name, off-int64(fn.Value))
			}
			return nil, &Refusal{Function: where, Reason: fmt.Sprintf("%d user-memory access(es) with fault fixups in the new code: a fault there would oops, because the guest's exception table does not cover the code area", len(keep))}
		}
		if !sp.keep {
			x.notes = append(x.notes, fmt.Sprintf("%s: %d entries dropped: %s", s.Name, len(keep), sp.note))
			continue
		}
		ns := &kobj.Section{Name: s.Name, Type: s.Type, Flags: s.Flags, Addralign: s.Addralign, Entsize: s.Entsize}
		for j, i := range keep {
			ns.Data = append(ns.Data, s.Data[i*size:(i+1)*size]...)
			for _, r := range s.RelocsIn(i*size, (i+1)*size) {
				nr := *r
				nr.Offset = uint64(j)*size + (r.Offset - i*size)
				ns.Relocs = append(ns.Relocs, &nr)
				if t, _ := codeTarget(r, true); t != nil && t.Name == ".altinstr_replacement" {
					add(t)
				} else if err := x.follow(s, r, add); err != nil {
					return nil, err
				}
			}
		}
		ns.Size = uint64(len(ns.Data))
		out = append(out, ns)
		x.notes = append(x.notes, fmt.Sprintf("%s: %d entries kept for the linker", s.Name, len(keep)))
	}
	return out, nil
}

// write builds the output object.
func (x *extractor) write(specials []*kobj.Section) (*Extracted, error) {
	after := x.in.After
	out := &kobj.File{}
	copies := map[*kobj.Section]*kobj.Section{}
	for _, s := range after.Sections {
		if !x.include[s] {
			continue
		}
		c := *s
		c.Data = append([]byte(nil), s.Data...)
		c.Relocs = nil
		copies[s] = &c
		out.Sections = append(out.Sections, &c)
	}
	// Symbols: section symbols and named symbols of included sections.
	symMap := map[*kobj.Symbol]*kobj.Symbol{}
	for _, s := range after.Symbols {
		if s.Section == nil || copies[s.Section] == nil {
			continue
		}
		c := *s
		c.Section = copies[s.Section]
		symMap[s] = &c
		out.Symbols = append(out.Symbols, &c)
	}
	mapSym := func(s *kobj.Symbol) (*kobj.Symbol, error) {
		if c, ok := symMap[s]; ok {
			return c, nil
		}
		if u, ok := x.ext[s]; ok {
			return u, nil
		}
		return nil, fmt.Errorf("symbol %s is neither included nor resolved", s.Name)
	}
	relocate := func(dst *kobj.Section, rs []*kobj.Reloc) error {
		for _, r := range rs {
			nr := *r
			if r.Sym != nil {
				if r.Sym.Name == "__fentry__" && isText(dst) {
					if err := nopFentry(dst, r); err != nil {
						return err
					}
					continue
				}
				from := r.Sym
				if c, ok := symMap[from]; ok {
					nr.Sym = c
				} else {
					if from.Type == elf.STT_SECTION {
						// Section-relative becomes symbol-relative.
						t := meant(after, r)
						if t == nil {
							return fmt.Errorf("relocation in %s at %#x: no symbol in %s at that offset", dst.Name, r.Offset, from.Name)
						}
						nr.Addend -= int64(t.Value)
						from = t
					}
					s, err := mapSym(from)
					if err != nil {
						return fmt.Errorf("relocation in %s at %#x: %w", dst.Name, r.Offset, err)
					}
					nr.Sym = s
				}
			}
			dst.Relocs = append(dst.Relocs, &nr)
		}
		return nil
	}
	for _, s := range after.Sections {
		if c := copies[s]; c != nil {
			if err := relocate(c, s.Relocs); err != nil {
				return nil, err
			}
		}
	}
	for _, s := range specials {
		rs := s.Relocs
		s.Relocs = nil
		if err := relocate(s, rs); err != nil {
			return nil, err
		}
		out.Sections = append(out.Sections, s)
		// Special sections refer to included code through section symbols
		// that exist already; nothing more to add.
	}
	for _, name := range sortedKeys(x.byName) {
		out.Symbols = append(out.Symbols, x.byName[name])
	}
	b, err := out.Write()
	if err != nil {
		return nil, err
	}
	x.out.Object = b
	x.out.Notes = append(x.out.Notes, x.notes...)
	sort.Strings(x.out.Imports)
	return &x.out, nil
}

// nopFentry turns `call __fentry__` into the kernel's 5-byte NOP: ftrace
// patches only the sites it recorded, and the code area is not one.
func nopFentry(s *kobj.Section, r *kobj.Reloc) error {
	if r.Offset < 1 || r.Offset+4 > uint64(len(s.Data)) || s.Data[r.Offset-1] != 0xe8 {
		return fmt.Errorf("%s+%#x: __fentry__ referenced other than by a call", s.Name, r.Offset)
	}
	copy(s.Data[r.Offset-1:], FentryNop)
	return nil
}

// ordinarySection reports code and plain data sections: what they hold
// about a replaced function (calls, pointers in tables) keeps working
// through the jump at its old entry.
func ordinarySection(s *kobj.Section) bool {
	if isText(s) {
		return true
	}
	for _, p := range []string{".data", ".rodata", ".bss", ".init.", ".exit.", ".ref.", ".meminit.", ".tbss", ".tdata"} {
		if strings.HasPrefix(s.Name, p) {
			return true
		}
	}
	return false
}

// meant finds the symbol a section-relative relocation refers to: the one
// covering the place it points at (for a PC-relative field, 4 bytes past
// the addend, as a call or RIP-relative operand ends there), else the
// section's only symbol at offset 0. With call padding a function sits 16
// bytes into its section, after its __pfx_ symbol, so "offset 0" is not
// enough.
func meant(f *kobj.File, r *kobj.Reloc) *kobj.Symbol {
	sec := r.Sym.Section
	off := int64(r.Sym.Value) + r.Addend
	if r.Type == elf.R_X86_64_PC32 || r.Type == elf.R_X86_64_PLT32 {
		off += 4
	}
	var best *kobj.Symbol
	for _, s := range f.SymbolsIn(sec) {
		if strings.HasPrefix(s.Name, "__pfx_") && off >= int64(s.Value+s.Size) {
			continue
		}
		if int64(s.Value) <= off && off < int64(s.Value+max(s.Size, 1)) {
			if best == nil || s.Value > best.Value {
				best = s
			}
		}
	}
	if best != nil {
		return best
	}
	return soleSymbol(f.SymbolsIn(sec))
}
