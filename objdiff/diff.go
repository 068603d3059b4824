package objdiff

import (
	"bytes"
	"debug/elf"
	"fmt"
	"regexp"
	"sort"
	"strings"

	"golang.org/x/arch/x86/x86asm"

	"github.com/hvpatch/hvpatch/kobj"
)

// Change is what Diff found in one pair of objects (both compiled with
// -ffunction-sections -fdata-sections, before and after the fix).
type Change struct {
	Changed  []string // functions whose code differs
	New      []string // functions only the fixed object has
	LineOnly []string // functions that differ only in __LINE__ immediates: left alone
	Removed  []string // functions only the old object has (no longer called by new code)
	NewData  []string // data only the fixed object has (placed with the new code)
}

// Refusal is a fix hvpatch will not turn into a hot patch, with the reason.
type Refusal struct {
	Function string // the function (or data) concerned, if one
	Reason   string
}

func (r *Refusal) Error() string {
	if r.Function == "" {
		return "refused: " + r.Reason
	}
	return fmt.Sprintf("refused: %s: %s", r.Function, r.Reason)
}

// Diff compares the functions and data of two objects. It refuses what a
// code-only patch cannot carry: changed initial values of existing data, a
// changed binding, changed init code, a changed function with no fentry
// site.
func Diff(before, after *kobj.File) (*Change, error) {
	c := &Change{}
	bf := funcsByName(before)
	af := funcsByName(after)
	for _, name := range sortedKeys(af) {
		a := af[name]
		b, ok := bf[name]
		if !ok {
			if initSection(a.Section.Name) {
				continue // new init code runs never in a booted kernel
			}
			c.New = append(c.New, name)
			continue
		}
		if (a.Bind == elf.STB_LOCAL) != (b.Bind == elf.STB_LOCAL) {
			return nil, &Refusal{Function: name, Reason: fmt.Sprintf("the fix changes its binding (%v → %v): callers in other files would disagree", b.Bind, a.Bind)}
		}
		same, lineOnly, err := sameFunc(before, b, after, a)
		if err != nil {
			return nil, err
		}
		switch {
		case same:
		case lineOnly:
			c.LineOnly = append(c.LineOnly, name)
		case initSection(a.Section.Name) || initSection(b.Section.Name):
			return nil, &Refusal{Function: name, Reason: "the fix changes __init/__exit code, which has already run (or will never run) in a booted kernel"}
		default:
			c.Changed = append(c.Changed, name)
		}
	}
	for _, name := range sortedKeys(bf) {
		if _, ok := af[name]; !ok {
			c.Removed = append(c.Removed, name)
		}
	}
	for _, name := range c.Changed {
		if !hasFentry(after, af[name]) {
			return nil, &Refusal{Function: name, Reason: fmt.Sprintf("it has no fentry site (notrace or noinstr), so no jump can be placed at its entry; its callers would have to be replaced instead: %s",
				strings.Join(callers(after, af[name]), ", "))}
		}
	}
	if err := diffData(before, after, c); err != nil {
		return nil, err
	}
	return c, nil
}

func funcsByName(f *kobj.File) map[string]*kobj.Symbol {
	out := map[string]*kobj.Symbol{}
	for _, s := range f.Functions() {
		// __pfx_ symbols are the padding before a function (call padding):
		// they come and go with their function.
		if isText(s.Section) && s.Size > 0 && !strings.HasPrefix(s.Name, "__pfx_") {
			out[s.Name] = s
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// target describes what a relocation refers to, independent of section
// layout and symbol numbering: a symbol name, or the string or bytes it
// points at.
func target(f *kobj.File, r *kobj.Reloc) string {
	if r.Sym == nil {
		return "none"
	}
	if r.Sym.Type != elf.STT_SECTION {
		return "sym " + r.Sym.Name
	}
	sec := r.Sym.Section
	if sec == nil {
		return "section ?"
	}
	off := int64(r.Sym.Value) + r.Addend
	if r.Type == elf.R_X86_64_PC32 || r.Type == elf.R_X86_64_PLT32 {
		off += 4
	}
	if sec.Flags&elf.SHF_STRINGS != 0 && sec.Data != nil && off >= 0 && off < int64(len(sec.Data)) {
		s := sec.Data[off:]
		if i := bytes.IndexByte(s, 0); i >= 0 {
			s = s[:i]
		}
		return fmt.Sprintf("string %q", s)
	}
	if s := symbolAt(f, sec, off); s != nil {
		return fmt.Sprintf("sym %s%+d", s.Name, off-int64(s.Value))
	}
	return fmt.Sprintf("section %s%+d", sec.Name, off)
}

// symbolAt finds the named symbol of sec that covers off (or starts there).
func symbolAt(f *kobj.File, sec *kobj.Section, off int64) *kobj.Symbol {
	var best *kobj.Symbol
	for _, s := range f.SymbolsIn(sec) {
		if int64(s.Value) <= off && (off < int64(s.Value+s.Size) || int64(s.Value) == off) {
			if best == nil || s.Value > best.Value || (s.Value == best.Value && s.Size > best.Size) {
				best = s
			}
		}
	}
	return best
}

// sameFunc compares two function bodies: the bytes outside relocated fields
// and, for every relocation, its type, place and target. lineOnly is true
// when the only differences are immediates moved by __LINE__.
func sameFunc(fa *kobj.File, a *kobj.Symbol, fb *kobj.File, b *kobj.Symbol) (same, lineOnly bool, err error) {
	ab, err := a.Bytes()
	if err != nil {
		return false, false, err
	}
	bb, err := b.Bytes()
	if err != nil {
		return false, false, err
	}
	if len(ab) != len(bb) {
		return false, false, nil
	}
	ra := a.Section.RelocsIn(a.Value, a.Value+a.Size)
	rb := b.Section.RelocsIn(b.Value, b.Value+b.Size)
	if len(ra) != len(rb) {
		return false, false, nil
	}
	sortRelocs(ra)
	sortRelocs(rb)
	mask := make([]bool, len(ab))
	for i := range ra {
		x, y := ra[i], rb[i]
		if x.Offset-a.Value != y.Offset-b.Value || x.Type != y.Type || target(fa, x) != target(fb, y) {
			return false, false, nil
		}
		if x.Sym != nil && x.Sym.Type != elf.STT_SECTION && x.Addend != y.Addend {
			return false, false, nil
		}
		for k := x.Offset - a.Value; k < x.Offset-a.Value+uint64(kobj.RelocWidth(x.Type)) && k < uint64(len(mask)); k++ {
			mask[k] = true
		}
	}
	if _, ok := compareMasked(ab, bb, mask); ok {
		return true, false, nil
	}
	return false, onlyLineImmediates(ab, bb), nil
}

func sortRelocs(rs []*kobj.Reloc) {
	sort.SliceStable(rs, func(i, j int) bool { return rs[i].Offset < rs[j].Offset })
}

// onlyLineImmediates reports code that differs only in the 32-bit
// immediates of `mov $imm, %reg` instructions holding small positive
// values: what __LINE__ passed to might_sleep() and friends looks like.
func onlyLineImmediates(a, b []byte) bool {
	diffs := 0
	for off := 0; off < len(a); {
		ia, ea := x86asm.Decode(a[off:], 64)
		ib, eb := x86asm.Decode(b[off:], 64)
		if ea != nil || eb != nil || ia.Len != ib.Len {
			// Undecodable (endbr64, padding): only equal bytes are fine.
			if bytes.Equal(a[off:], b[off:]) {
				return diffs > 0
			}
			if ea == nil && eb == nil || ia.Len == 0 {
				return false
			}
			if !bytes.Equal(a[off:off+1], b[off:off+1]) {
				return false
			}
			off++
			continue
		}
		if !bytes.Equal(a[off:off+ia.Len], b[off:off+ia.Len]) {
			if !lineMove(ia, ib) {
				return false
			}
			diffs++
		}
		off += ia.Len
	}
	return diffs > 0
}

func lineMove(a, b x86asm.Inst) bool {
	if a.Op != x86asm.MOV || b.Op != x86asm.MOV || a.Args[0] != b.Args[0] {
		return false
	}
	if _, ok := a.Args[0].(x86asm.Reg); !ok {
		return false
	}
	ia, ok1 := a.Args[1].(x86asm.Imm)
	ib, ok2 := b.Args[1].(x86asm.Imm)
	return ok1 && ok2 && ia > 0 && ib > 0 && ia < 1<<20 && ib < 1<<20
}

// hasFentry reports whether the function starts with the ftrace call
// (after endbr64 on IBT kernels): only such a site can take the jump.
func hasFentry(f *kobj.File, fn *kobj.Symbol) bool {
	for _, r := range fn.Section.RelocsIn(fn.Value, fn.Value+9) {
		if r.Sym != nil && r.Sym.Name == "__fentry__" && (r.Offset == fn.Value+1 || r.Offset == fn.Value+5) {
			return true
		}
	}
	return false
}

// callers lists the functions of f that call or reference fn.
func callers(f *kobj.File, fn *kobj.Symbol) []string {
	seen := map[string]bool{}
	for _, s := range f.Sections {
		if !isText(s) {
			continue
		}
		for _, r := range s.Relocs {
			if r.Sym == nil {
				continue
			}
			if r.Sym == fn || (r.Sym.Type == elf.STT_SECTION && r.Sym.Section == fn.Section) {
				if c := symbolAt(f, s, int64(r.Offset)); c != nil && c != fn {
					seen[c.Name] = true
				}
			}
		}
	}
	if len(seen) == 0 {
		return []string{"(none in this file)"}
	}
	return sortedKeys(seen)
}

// lineSuffix matches gcc's numbering of function-local statics
// (__already_done.12, _rs.3): it may shift when code moves.
var lineSuffix = regexp.MustCompile(`\.[0-9]+$`)

// diffData refuses changed initial values of data both objects have and
// records data only the fixed object has.
func diffData(before, after *kobj.File, c *Change) error {
	bd := dataByName(before)
	for _, name := range sortedKeys(dataByName(after)) {
		a := dataByName(after)[name]
		b, ok := bd[name]
		if !ok {
			if !lineSuffix.MatchString(name) {
				c.NewData = append(c.NewData, name)
			}
			continue
		}
		if a.Section.Flags&elf.SHF_WRITE == 0 || lineSuffix.MatchString(name) {
			continue // read-only data is copied with the code; numbered statics are matched by use
		}
		if a.Size != b.Size {
			return &Refusal{Function: name, Reason: fmt.Sprintf("the fix changes the size of existing data (%d → %d bytes): the running kernel's copy cannot change", b.Size, a.Size)}
		}
		if a.Section.Type == elf.SHT_NOBITS && b.Section.Type == elf.SHT_NOBITS {
			continue
		}
		ab, _ := a.Bytes()
		bb, _ := b.Bytes()
		if a.Section.Type != b.Section.Type || !bytes.Equal(ab, bb) {
			return &Refusal{Function: name, Reason: "the fix changes the initial value of existing data; the running kernel keeps its own copy"}
		}
	}
	return nil
}

func dataByName(f *kobj.File) map[string]*kobj.Symbol {
	out := map[string]*kobj.Symbol{}
	for _, s := range f.Symbols {
		if s.Type == elf.STT_OBJECT && s.Defined() && !isText(s.Section) && !ignoredSection(s.Section) && specialOf(s.Section.Name) == nil {
			out[s.Name] = s
		}
	}
	return out
}
