package objdiff

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"sort"
	"strings"

	"github.com/hvpatch/hvpatch/kobj"
	"github.com/hvpatch/hvpatch/symbols"
)

// Guest is what Verify reads of a running (or dumped) kernel.
type Guest interface {
	// Lookup lists the kallsyms entries called name, in address order: the
	// kernel image's, or for a module's object the module's own entries
	// when it has that name and the image's otherwise (the order the
	// linker resolves names in at apply time).
	Lookup(name string) []symbols.Symbol
	ReadVirt(addr uint64, b []byte) error
}

// GuestFunc is where an object's function lives in the guest.
type GuestFunc struct {
	Name   string
	Addr   uint64
	Sympos int // 1-based position among the kallsyms entries of that name
	Count  int // how many kallsyms entries have that name
	// Copies counts identical, interchangeable copies (the same static
	// helper compiled into several files); 0 or 1 when the match is unique.
	Copies int
}

// Ref is the kallsyms name the linker resolves for it: plain when the name
// is unique, "name,N" when N-th of several.
func (g GuestFunc) Ref() string { return symRef(g.Name, g.Sympos, g.Count) }

func symRef(name string, pos, count int) string {
	if count <= 1 {
		return name
	}
	return fmt.Sprintf("%s,%d", name, pos)
}

// Match is the result of Verify.
type Match struct {
	Funcs    map[string]GuestFunc // object function name → guest copy
	Verified int                  // functions compared byte for byte
	Skipped  []string             // functions not compared, with why
	// sections maps a section of the object to its guest address, learnt
	// from the relocated fields of verified functions; symbols likewise for
	// relocations against named symbols.
	sections map[string]uint64
	symbols  map[string]uint64
	obj      *kobj.File
}

// ErrNotInGuest says no function of the object is in the symbols the Guest
// view has (its code is elsewhere: a module, or not built into this kernel).
var ErrNotInGuest = errors.New("no function of the object could be compared with the guest's code")

// MismatchError says the object is not the guest's code.
type MismatchError struct {
	Function string
	Addr     uint64 // guest address of the closest candidate
	Offset   uint64
	Want     []byte // object bytes from Offset (up to 8)
	Got      []byte // guest bytes from Offset
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("function %s differs from the guest's copy at %#x: at +%#x the compiled code has % x, the guest % x (wrong source version, config or compiler)",
		e.Function, e.Addr, e.Offset, e.Want, e.Got)
}

// Verify checks that every function of obj (compiled without
// -ffunction-sections, exactly as the guest's kernel was) equals the
// guest's copy, with relocated fields and the sites the kernel rewrites at
// boot masked. It also picks, among several kallsyms entries of one name,
// the one whose bytes match.
func Verify(obj *kobj.File, g Guest) (*Match, error) {
	m := &Match{Funcs: map[string]GuestFunc{}, sections: map[string]uint64{}, symbols: map[string]uint64{}, obj: obj}
	masks := bootMasks(obj)
	conflict := map[string]bool{}
	for _, fn := range obj.Functions() {
		sec := fn.Section
		if !isText(sec) || fn.Size == 0 {
			continue
		}
		if initSection(sec.Name) {
			m.Skipped = append(m.Skipped, fn.Name+" (init or exit code, freed or discarded in the guest)")
			continue
		}
		want, err := fn.Bytes()
		if err != nil {
			return nil, err
		}
		cands := textSymbols(g.Lookup(fn.Name))
		if len(cands) == 0 {
			m.Skipped = append(m.Skipped, fn.Name+" (not in the guest's kallsyms)")
			continue
		}
		mask := funcMask(sec, fn, masks[sec])
		var matched []int
		var best *MismatchError
		got := make([]byte, len(want))
		for i, c := range cands {
			if err := g.ReadVirt(c.Addr, got); err != nil {
				return nil, fmt.Errorf("reading %s at %#x (%d bytes) in the guest: %w", fn.Name, c.Addr, len(got), err)
			}
			if off, ok := compareMasked(want, got, mask); ok {
				matched = append(matched, i)
			} else if best == nil || off > best.Offset {
				end := min(off+8, uint64(len(want)))
				best = &MismatchError{Function: fn.Name, Addr: c.Addr, Offset: off,
					Want: append([]byte(nil), want[off:end]...), Got: append([]byte(nil), got[off:end]...)}
			}
		}
		switch len(matched) {
		case 0:
			return nil, best
		case 1:
			c := cands[matched[0]]
			m.Funcs[fn.Name] = GuestFunc{Name: fn.Name, Addr: c.Addr, Sympos: sympos(g.Lookup(fn.Name), c.Addr), Count: len(g.Lookup(fn.Name))}
			m.Verified++
			if err := g.ReadVirt(c.Addr, got); err != nil {
				return nil, err
			}
			m.learn(sec, fn, c.Addr, got, masks[sec], conflict)
		default:
			// Identical copies (the same static helper in several files).
			// When every copy also refers to the same addresses, they are
			// interchangeable and any one serves; otherwise the bytes
			// cannot say which is this file's.
			m.Verified++
			var first *Match
			same := true
			for _, i := range matched {
				c := cands[i]
				if err := g.ReadVirt(c.Addr, got); err != nil {
					return nil, err
				}
				one := &Match{sections: map[string]uint64{}, symbols: map[string]uint64{}}
				one.learn(sec, fn, c.Addr, got, masks[sec], map[string]bool{})
				if first == nil {
					first = one
				} else if !maps.Equal(first.sections, one.sections) || !maps.Equal(first.symbols, one.symbols) {
					same = false
				}
			}
			if !same {
				m.Skipped = append(m.Skipped, fmt.Sprintf("%s (%d identical copies in the guest; which one is this file's is unknown)", fn.Name, len(matched)))
				break
			}
			c := cands[matched[0]]
			m.Funcs[fn.Name] = GuestFunc{Name: fn.Name, Addr: c.Addr, Sympos: sympos(g.Lookup(fn.Name), c.Addr), Count: len(g.Lookup(fn.Name)), Copies: len(matched)}
		}
	}
	for k := range conflict {
		delete(m.sections, k)
		delete(m.symbols, k)
	}
	if m.Verified == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNotInGuest, strings.Join(m.Skipped, "; "))
	}
	return m, nil
}

// textSymbols keeps the code symbols (of whatever scope the Guest view
// gives: the kernel image, or one module and the image).
func textSymbols(syms []symbols.Symbol) []symbols.Symbol {
	var out []symbols.Symbol
	for _, s := range syms {
		if symbols.IsText(s.Type) {
			out = append(out, s)
		}
	}
	return out
}

// sympos is the 1-based position of addr among all entries of a name.
func sympos(all []symbols.Symbol, addr uint64) int {
	for i, s := range all {
		if s.Addr == addr {
			return i + 1
		}
	}
	return 0
}

// span is a byte range of a section the guest may hold differently.
type span struct{ lo, hi uint64 }

// bootMasks finds, per text section, the sites the kernel rewrites at boot
// or that objtool/ftrace describe: jump labels, alternatives, static calls,
// paravirt sites, lock prefixes.
func bootMasks(obj *kobj.File) map[*kobj.Section][]span {
	out := map[*kobj.Section][]span{}
	for _, s := range obj.Sections {
		sp := specialOf(s.Name)
		if sp == nil || !sp.patched {
			continue
		}
		size, ok := entrySize(sp, s)
		if !ok {
			continue
		}
		for i := uint64(0); i < s.Size/size; i++ {
			r := siteReloc(s, size, i)
			if r == nil {
				continue
			}
			sec, off := codeTarget(r, true)
			if sec == nil || off < 0 {
				continue
			}
			n := uint64(sp.siteLen)
			switch sp.name {
			case ".altinstructions":
				if s.Data != nil {
					n = uint64(s.Data[i*size+size-2]) // instrlen, then replacementlen
				}
			case ".parainstructions":
				if s.Data != nil {
					n = uint64(s.Data[i*size+9])
				}
			case "__jump_table":
				if o := uint64(off); sec.Data != nil && o+2 <= uint64(len(sec.Data)) &&
					(sec.Data[o] == 0xeb || (sec.Data[o] == 0x66 && sec.Data[o+1] == 0x90)) {
					n = 2 // objtool shortened the site
				}
			}
			out[sec] = append(out[sec], span{uint64(off), uint64(off) + n})
		}
	}
	return out
}

// bootPatchedCall reports call/jump targets whose sites the kernel rewrites
// at boot: ftrace's entry call, return and retpoline thunks, static-call
// trampolines.
func bootPatchedCall(name string) bool {
	return name == "__fentry__" || name == "__x86_return_thunk" || strings.HasPrefix(name, "__x86_indirect_") ||
		strings.HasPrefix(name, "__SCT__") || name == "__x86_return_skl" || strings.HasPrefix(name, "__x86_indirect_call_thunk")
}

// funcMask marks the bytes of fn that need not match the guest: relocated
// fields, whole instructions the kernel rewrites, boot-patched sites.
func funcMask(sec *kobj.Section, fn *kobj.Symbol, sites []span) []bool {
	lo, hi := fn.Value, fn.Value+fn.Size
	mask := make([]bool, fn.Size)
	set := func(a, b uint64) {
		for i := max(a, lo); i < min(b, hi); i++ {
			mask[i-lo] = true
		}
	}
	for _, r := range sec.RelocsIn(lo, hi) {
		w := uint64(kobj.RelocWidth(r.Type))
		set(r.Offset, r.Offset+w)
		if r.Sym != nil && bootPatchedCall(r.Sym.Name) && sec.Data != nil {
			// The opcode too: e8/e9 rel32 or 0f 8x rel32 may become a NOP,
			// a ret, or an indirect call.
			start := r.Offset
			if start >= 1 && (sec.Data[start-1] == 0xe8 || sec.Data[start-1] == 0xe9) {
				start--
			} else if start >= 2 && sec.Data[start-2] == 0x0f && sec.Data[start-1]&0xf0 == 0x80 {
				start -= 2
			}
			set(start, r.Offset+w)
		}
	}
	for _, s := range sites {
		set(s.lo, s.hi)
	}
	// IBT kernels seal (overwrite with a 4-byte NOP) the endbr64 of every
	// function whose address is never taken; objtool lists them only when
	// it runs on the whole vmlinux, so accept either at an entry.
	if sec.Data != nil && fn.Size >= 4 && string(sec.Data[lo:lo+4]) == "\xf3\x0f\x1e\xfa" {
		set(lo, lo+4)
	}
	return mask
}

// compareMasked returns the first differing unmasked offset, or ok.
func compareMasked(want, got []byte, mask []bool) (uint64, bool) {
	for i := range want {
		if !mask[i] && want[i] != got[i] {
			return uint64(i), false
		}
	}
	return 0, true
}

// learn reads, from the guest copy of a verified function, where each
// relocation of it points: that gives the guest address of every section
// (static data, string tables) and symbol the function refers to.
func (m *Match) learn(sec *kobj.Section, fn *kobj.Symbol, addr uint64, got []byte, sites []span, conflict map[string]bool) {
	inSite := func(off uint64) bool {
		for _, s := range sites {
			if off >= s.lo && off < s.hi {
				return true
			}
		}
		return false
	}
	for _, r := range sec.RelocsIn(fn.Value, fn.Value+fn.Size) {
		if r.Sym == nil || bootPatchedCall(r.Sym.Name) || inSite(r.Offset) {
			continue
		}
		o := r.Offset - fn.Value
		w := uint64(kobj.RelocWidth(r.Type))
		if w == 0 || o+w > uint64(len(got)) {
			continue
		}
		place := addr + o
		var s uint64
		switch r.Type {
		case elf.R_X86_64_PC32, elf.R_X86_64_PLT32:
			s = place + uint64(int64(int32(binary.LittleEndian.Uint32(got[o:])))) - uint64(r.Addend)
		case elf.R_X86_64_32S:
			s = uint64(int64(int32(binary.LittleEndian.Uint32(got[o:])))) - uint64(r.Addend)
		case elf.R_X86_64_32:
			s = uint64(binary.LittleEndian.Uint32(got[o:])) - uint64(r.Addend)
		case elf.R_X86_64_64:
			s = binary.LittleEndian.Uint64(got[o:]) - uint64(r.Addend)
		case elf.R_X86_64_PC64:
			s = place + binary.LittleEndian.Uint64(got[o:]) - uint64(r.Addend)
		default:
			continue
		}
		table, key := m.symbols, r.Sym.Name
		if r.Sym.Type == elf.STT_SECTION {
			if r.Sym.Section == nil {
				continue
			}
			table, key = m.sections, r.Sym.Section.Name
			s -= r.Sym.Value
		}
		if prev, ok := table[key]; ok && prev != s {
			conflict[key] = true
		}
		table[key] = s
	}
}

// AddrOf gives the guest address of a symbol defined in the verified
// object (a static variable or function), learnt from the guest's code.
func (m *Match) AddrOf(name string) (uint64, bool) {
	if f, ok := m.Funcs[name]; ok {
		return f.Addr, true
	}
	if a, ok := m.symbols[name]; ok {
		return a, true
	}
	s := m.obj.Symbol(name)
	if s == nil || s.Section == nil {
		return 0, false
	}
	base, ok := m.sections[s.Section.Name]
	if !ok {
		return 0, false
	}
	return base + s.Value, true
}

// Sections lists the object sections whose guest address was learnt.
func (m *Match) Sections() []string {
	var out []string
	for k := range m.sections {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
