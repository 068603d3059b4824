package patcher

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
)

// Symbol is a guest kernel symbol as the planner needs it.
type Symbol struct {
	Name string
	Addr uint64
	Size uint64 // 0 when unknown
}

// Target is the guest kernel seen from the host: symbols and virtual memory.
// A live guest (introspect.Kernel) and a fixture in tests both provide it.
type Target interface {
	// Release is the kernel release from the banner, e.g. 6.1.0-56-cloud-amd64.
	Release() string
	// Symbols returns every symbol of that name (static names can repeat).
	Symbols(name string) []Symbol
	// Describe names the symbol holding addr ("func+0x12"), or "".
	Describe(addr uint64) string
	ReadVirt(va uint64, p []byte) error
	// Translate gives the guest-physical address of va and the size of the
	// page that maps it.
	Translate(va uint64) (gpa, pageSize uint64, err error)
}

// maxNotes bounds how much of the notes section is read.
const maxNotes = 64 << 10

// BuildID returns the kernel's GNU build id (hex, as readelf prints it),
// read from the ELF notes the kernel keeps in memory between __start_notes
// and __stop_notes. "" with a nil error means the kernel has no such note.
func BuildID(t Target) (string, error) {
	start, err := uniqueSymbol(t, "__start_notes")
	if err != nil {
		return "", nil // kernels without the notes section have no build id to offer
	}
	stop, err := uniqueSymbol(t, "__stop_notes")
	if err != nil || stop.Addr < start.Addr || stop.Addr-start.Addr > maxNotes {
		return "", fmt.Errorf("kernel notes: bad bounds __start_notes %#x __stop_notes %#x", start.Addr, stop.Addr)
	}
	notes := make([]byte, stop.Addr-start.Addr)
	if err := t.ReadVirt(start.Addr, notes); err != nil {
		return "", fmt.Errorf("reading kernel notes at %#x: %w", start.Addr, err)
	}
	id, err := ParseBuildIDNote(notes)
	if err != nil {
		return "", fmt.Errorf("kernel notes at %#x: %w", start.Addr, err)
	}
	return hex.EncodeToString(id), nil
}

// ParseBuildIDNote finds the NT_GNU_BUILD_ID descriptor in a sequence of
// ELF notes (4-byte aligned, as in a 64-bit kernel's .notes). It returns nil
// if there is none.
func ParseBuildIDNote(notes []byte) ([]byte, error) {
	const ntGNUBuildID = 3
	align := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for off := uint64(0); off+12 <= uint64(len(notes)); {
		namesz := uint64(binary.LittleEndian.Uint32(notes[off:]))
		descsz := uint64(binary.LittleEndian.Uint32(notes[off+4:]))
		typ := binary.LittleEndian.Uint32(notes[off+8:])
		name := off + 12
		desc := name + align(namesz)
		next := desc + align(descsz)
		if namesz > uint64(len(notes)) || descsz > uint64(len(notes)) || next > uint64(len(notes)) {
			return nil, fmt.Errorf("note at offset %#x runs past the end (namesz %d descsz %d)", off, namesz, descsz)
		}
		if typ == ntGNUBuildID && namesz == 4 && string(notes[name:name+4]) == "GNU\x00" {
			return append([]byte(nil), notes[desc:desc+descsz]...), nil
		}
		off = next
	}
	return nil, nil
}

// bootIdentityVars are variables the kernel randomises at every boot
// (KASLR of the direct map, vmalloc and vmemmap areas). With the kernel's
// own load address they tell one boot from the next.
var bootIdentityVars = []string{"page_offset_base", "vmalloc_base", "vmemmap_base"}

// BootIdentity returns a string that changes when the guest reboots: a
// hash of the release, the address of _text (KASLR slide) and the values
// of the randomised region bases. Two boots collide only if every one of
// them lands on the same random choices; a guest booted with nokaslr has
// the same identity every boot, which reconcile covers by checking the
// bytes themselves.
func BootIdentity(t Target) (string, error) {
	h := sha256.New()
	h.Write([]byte(t.Release()))
	text, err := uniqueSymbol(t, "_text")
	if err != nil {
		return "", fmt.Errorf("boot identity: %w", err)
	}
	binary.Write(h, binary.LittleEndian, text.Addr)
	for _, name := range bootIdentityVars {
		s, err := uniqueSymbol(t, name)
		if err != nil {
			continue // older kernels lack some; the others still count
		}
		var v [8]byte
		if err := t.ReadVirt(s.Addr, v[:]); err != nil {
			return "", fmt.Errorf("boot identity: reading %s at %#x: %w", name, s.Addr, err)
		}
		h.Write(v[:])
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), nil
}

// distinctSymbols lists the symbols called name in kallsyms (address)
// order, aliases at one address counted once.
func distinctSymbols(t Target, name string) []Symbol {
	all := append([]Symbol(nil), t.Symbols(name)...)
	sort.SliceStable(all, func(i, j int) bool { return all[i].Addr < all[j].Addr })
	var syms []Symbol
	for _, s := range all {
		if n := len(syms); n > 0 && syms[n-1].Addr == s.Addr {
			if syms[n-1].Size == 0 {
				syms[n-1].Size = s.Size
			}
			continue
		}
		syms = append(syms, s)
	}
	return syms
}

// uniqueSymbol is the one symbol called name; several at different
// addresses are an error.
func uniqueSymbol(t Target, name string) (Symbol, error) {
	syms := distinctSymbols(t, name)
	switch len(syms) {
	case 0:
		return Symbol{}, fmt.Errorf("unknown symbol %s in guest kernel %s", name, t.Release())
	case 1:
		return syms[0], nil
	}
	return Symbol{}, fmt.Errorf("symbol %s is ambiguous in guest kernel %s: %d definitions: %s", name, t.Release(), len(syms), candidates(syms))
}

// ModuleTarget is a Target that also reads the symbols of loaded modules
// (each module's own symbol table).
type ModuleTarget interface {
	// ModuleSymbols returns the symbols called name of the loaded module
	// called module; an error when that module is not loaded or its table
	// cannot be read.
	ModuleSymbols(module, name string) ([]Symbol, error)
}

// symbolOf resolves the symbol an edit is at: in the kernel image
// (editSymbol), or with module: set in that loaded module's own table.
func symbolOf(t Target, e *Edit) (Symbol, error) {
	if e.Module == "" {
		return editSymbol(t, e.Name(), e.Pos())
	}
	mt, ok := t.(ModuleTarget)
	if !ok {
		return Symbol{}, fmt.Errorf("module %s: this target cannot read module symbols", e.Module)
	}
	all, err := mt.ModuleSymbols(e.Module, e.Name())
	if err != nil {
		return Symbol{}, err
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Addr < all[j].Addr })
	var syms []Symbol
	for _, s := range all {
		if n := len(syms); n > 0 && syms[n-1].Addr == s.Addr {
			continue
		}
		syms = append(syms, s)
	}
	where := fmt.Sprintf("module %s of guest kernel %s", e.Module, t.Release())
	switch pos := e.Pos(); {
	case len(syms) == 0:
		return Symbol{}, fmt.Errorf("unknown symbol %s in %s", e.Name(), where)
	case pos > len(syms):
		return Symbol{}, fmt.Errorf("sympos %d: %s has %d symbol(s) %s: %s", pos, where, len(syms), e.Name(), candidates(syms))
	case pos > 0:
		return syms[pos-1], nil
	case len(syms) == 1:
		return syms[0], nil
	}
	return Symbol{}, fmt.Errorf("symbol %s is ambiguous in %s: %d definitions: %s; add sympos: N to the edit to pick the N-th",
		e.Name(), where, len(syms), candidates(syms))
}

// editSymbol resolves the symbol an edit names: the only one of that name,
// or with sympos N >= 1 the N-th in kallsyms order. An ambiguous name
// without sympos is an error listing the candidates.
func editSymbol(t Target, name string, sympos int) (Symbol, error) {
	syms := distinctSymbols(t, name)
	switch {
	case len(syms) == 0:
		return Symbol{}, fmt.Errorf("unknown symbol %s in guest kernel %s", name, t.Release())
	case sympos > len(syms):
		return Symbol{}, fmt.Errorf("sympos %d: guest kernel %s has %d symbol(s) %s: %s", sympos, t.Release(), len(syms), name, candidates(syms))
	case sympos > 0:
		return syms[sympos-1], nil
	case len(syms) == 1:
		return syms[0], nil
	}
	return Symbol{}, fmt.Errorf("symbol %s is ambiguous in guest kernel %s: %d definitions: %s; add sympos: N to the edit to pick the N-th",
		name, t.Release(), len(syms), candidates(syms))
}

// candidates lists symbols as "sympos 1 at 0x... (size 0x..)".
func candidates(syms []Symbol) string {
	parts := make([]string, len(syms))
	for i, s := range syms {
		parts[i] = fmt.Sprintf("sympos %d at %#x", i+1, s.Addr)
		if s.Size > 0 {
			parts[i] += fmt.Sprintf(" (size %#x)", s.Size)
		}
	}
	return strings.Join(parts, ", ")
}

// LoadedModule is one module in the guest's module list.
type LoadedModule struct {
	Name string
	Base uint64 // start of its core text (/proc/modules' address)
	// Settled: live, its init over (introspect.Module.Settled).
	Settled bool
}

// ModuleLister is a Target that lists the guest's loaded modules.
type ModuleLister interface {
	LoadedModules() ([]LoadedModule, error)
}

// loadedModule finds a module by name in t's module list.
func loadedModule(t Target, name string) (LoadedModule, bool, error) {
	ml, ok := t.(ModuleLister)
	if !ok {
		return LoadedModule{}, false, fmt.Errorf("module %s: this target cannot list modules", name)
	}
	mods, err := ml.LoadedModules()
	if err != nil {
		return LoadedModule{}, false, err
	}
	for _, m := range mods {
		if m.Name == name {
			return m, true, nil
		}
	}
	return LoadedModule{}, false, nil
}

// Modules lists the modules a patch's edits name (module:), each once, in
// edit order.
func (p *Patch) Modules() []string {
	var out []string
	seen := map[string]bool{}
	for _, e := range p.Edits {
		if e.Module != "" && !seen[e.Module] {
			seen[e.Module] = true
			out = append(out, e.Module)
		}
	}
	return out
}

// MissingModules lists the modules p's edits name that are not loaded
// and settled in the guest (what a late patch waits for); nil when all
// are there. settling is set when one of them is in the module list but
// not settled yet (its init is running or just over): worth another look
// soon.
func MissingModules(t Target, p *Patch) (missing []string, settling bool, err error) {
	names := p.Modules()
	if len(names) == 0 {
		return nil, false, nil
	}
	ml, ok := t.(ModuleLister)
	if !ok {
		return nil, false, fmt.Errorf("module %s: this target cannot list modules", names[0])
	}
	mods, err := ml.LoadedModules()
	if err != nil {
		return nil, false, err
	}
	for _, name := range names {
		found := false
		for _, m := range mods {
			if m.Name == name {
				found = true
				if !m.Settled {
					missing, settling = append(missing, name), true
				}
				break
			}
		}
		if !found {
			missing = append(missing, name)
		}
	}
	return missing, settling, nil
}
