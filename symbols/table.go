// Package symbols holds kernel symbol tables: what a name's address is and
// which symbol an address falls in. Tables come from the kernel's own
// compressed kallsyms found in guest memory (DecodeKallsyms), from a
// System.map, or from a vmlinux ELF that still has its .symtab.
package symbols

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Symbol is one entry as /proc/kallsyms shows it.
type Symbol struct {
	Name   string
	Addr   uint64
	Type   byte   // 'T', 't', 'D', 'A', ... as /proc/kallsyms prints it
	Module string // "" for the kernel image
}

// Table is an immutable symbol table, sorted by address (input order kept
// among symbols at the same address), with an index by name built on first
// use so that decoding stays cheap for callers that only resolve addresses.
type Table struct {
	syms []Symbol

	nameOnce sync.Once
	first    map[string]int32 // name -> index of its first symbol
	next     []int32          // index -> next index with the same name, or -1

	textOnce sync.Once
	textFrom []int32 // index -> first index at or after it of a text symbol, or -1

	// A view made by WithSlide shares base's symbols and indexes and adds
	// slide to every address but absolute ones; syms is nil until All
	// needs the slid copy.
	base    *Table
	slide   uint64
	allOnce sync.Once
}

// slid is s as this table shows it.
func (t *Table) slid(s Symbol) Symbol {
	if s.Type != 'A' && s.Type != 'a' {
		s.Addr += t.slide
	}
	return s
}

// root is the table holding the symbols (t itself unless t is a view).
func (t *Table) root() *Table {
	if t.base != nil {
		return t.base
	}
	return t
}

// at is the i-th symbol in address order.
func (t *Table) at(i int) Symbol {
	if t.base != nil {
		return t.slid(t.base.syms[i])
	}
	return t.syms[i]
}

// NewTable builds a table from syms (copied; the caller keeps its slice).
func NewTable(syms []Symbol) *Table {
	return newTableOwned(slices.Clone(syms))
}

// newTableOwned takes ownership of syms. kallsyms is already in address
// order, so the sort is skipped when nothing is out of place.
func newTableOwned(syms []Symbol) *Table {
	sorted := true
	for i := 1; i < len(syms); i++ {
		if syms[i].Addr < syms[i-1].Addr {
			sorted = false
			break
		}
	}
	if !sorted {
		slices.SortStableFunc(syms, func(a, b Symbol) int {
			switch {
			case a.Addr < b.Addr:
				return -1
			case a.Addr > b.Addr:
				return 1
			}
			return 0
		})
	}
	return &Table{syms: syms}
}

// Len is the number of symbols.
func (t *Table) Len() int { return len(t.root().syms) }

// All returns the symbols in address order (kallsyms order among equal
// addresses). The slice is the table's own: do not modify it.
func (t *Table) All() []Symbol {
	if t.base != nil {
		t.allOnce.Do(func() {
			t.syms = make([]Symbol, len(t.base.syms))
			for i, s := range t.base.syms {
				t.syms[i] = t.slid(s)
			}
		})
	}
	return slices.Clip(t.syms)
}

func (t *Table) buildNameIndex() {
	t.first = make(map[string]int32, len(t.syms))
	t.next = make([]int32, len(t.syms))
	last := make(map[string]int32, 1024) // only for names seen twice or more
	for i := range t.syms {
		t.next[i] = -1
		name := t.syms[i].Name
		f, dup := t.first[name]
		if !dup {
			t.first[name] = int32(i)
			continue
		}
		tail, ok := last[name]
		if !ok {
			tail = f
		}
		t.next[tail] = int32(i)
		last[name] = int32(i)
	}
}

// Lookup returns every symbol called name, in address order.
func (t *Table) Lookup(name string) []Symbol {
	r := t.root()
	r.nameOnce.Do(r.buildNameIndex)
	i, ok := r.first[name]
	if !ok {
		return nil
	}
	var out []Symbol
	for ; i >= 0; i = r.next[i] {
		out = append(out, t.at(int(i)))
	}
	return out
}

// Addr returns the address of the symbol called name. It fails when there is
// none, or when several symbols of that name sit at different addresses
// (static functions of the same name in different files).
func (t *Table) Addr(name string) (uint64, error) {
	syms := t.Lookup(name)
	if len(syms) == 0 {
		return 0, fmt.Errorf("symbols: no symbol %q", name)
	}
	for _, s := range syms[1:] {
		if s.Addr != syms[0].Addr {
			addrs := make([]string, len(syms))
			for i, s := range syms {
				addrs[i] = fmt.Sprintf("%#x (%c)", s.Addr, s.Type)
			}
			return 0, fmt.Errorf("symbols: %q is ambiguous, %d symbols: %s", name, len(syms), strings.Join(addrs, ", "))
		}
	}
	return syms[0].Addr, nil
}

// Resolve finds the symbol an address belongs to: the nearest symbol at or
// below addr (the first in kallsyms order when several share that address,
// as the kernel's own lookup does). An address above the last symbol has no
// upper bound to be checked against and is not resolved.
func (t *Table) Resolve(addr uint64) (sym Symbol, off uint64, ok bool) {
	n := t.Len()
	i := sort.Search(n, func(i int) bool { return t.at(i).Addr > addr })
	if i == 0 {
		return Symbol{}, 0, false
	}
	at := t.at(i - 1).Addr
	if i == n && at != addr {
		return Symbol{}, 0, false
	}
	// The first of the symbols at that address, by binary search: a guest
	// may put any number of symbols at one address.
	j := sort.Search(i, func(j int) bool { return t.at(j).Addr >= at })
	return t.at(j), addr - at, true
}

// IsText reports whether a kallsyms type letter marks code.
func IsText(typ byte) bool {
	switch typ {
	case 'T', 't', 'W', 'w':
		return true
	}
	return false
}

// FunctionSize is the distance from s to the next text symbol at a higher
// address, or 0 when there is none. On kernels with call padding the next
// symbol is the following function's __pfx_ symbol, so the padding is not
// counted.
func (t *Table) FunctionSize(s Symbol) uint64 {
	n := t.Len()
	i := sort.Search(n, func(i int) bool { return t.at(i).Addr > s.Addr })
	r := t.root()
	r.textOnce.Do(r.buildTextIndex)
	if i < n {
		if j := r.textFrom[i]; j >= 0 {
			return t.at(int(j)).Addr - s.Addr
		}
	}
	return 0
}

// buildTextIndex makes FunctionSize constant-time after the search: a
// guest may put any number of data symbols between two functions.
func (t *Table) buildTextIndex() {
	t.textFrom = make([]int32, len(t.syms))
	next := int32(-1)
	for i := len(t.syms) - 1; i >= 0; i-- {
		if IsText(t.syms[i].Type) {
			next = int32(i)
		}
		t.textFrom[i] = next
	}
}

// WithSlide returns a table with every address moved by slide (added modulo
// 2^64, so a negative slide works too), except absolute symbols (type A/a):
// kallsyms marks zero-based per-CPU symbols absolute, and KASLR does not move
// them.
//
// The new table shares t's symbols and indexes (a few dozen bytes, however
// large t is) when moving the addresses keeps them in order, which it does
// for a kernel's own table (absolute symbols are small, the rest sit high in
// the address space); otherwise it is a sorted copy.
func (t *Table) WithSlide(slide uint64) *Table {
	r, total := t.root(), t.slide+slide
	if t.base == nil {
		total = slide
	}
	view := &Table{base: r, slide: total}
	prev := uint64(0)
	for i := range r.syms {
		a := view.at(i).Addr
		if a < prev { // out of order once moved: a sorted copy

			return copySlid(r, total)
		}
		prev = a
	}
	return view
}

// copySlid is a sorted copy of r with every address but absolute ones moved.
func copySlid(r *Table, slide uint64) *Table {
	out := make([]Symbol, len(r.syms))
	for i, s := range r.syms {
		if s.Type != 'A' && s.Type != 'a' {
			s.Addr += slide
		}
		out[i] = s
	}
	return newTableOwned(out)
}

// WriteKallsyms writes the table in the /proc/kallsyms text format.
func (t *Table) WriteKallsyms(w io.Writer) error {
	bw := bufio.NewWriterSize(w, 1<<16)
	var line []byte
	for i := range t.Len() {
		s := t.at(i)
		line = line[:0]
		hex := strconv.AppendUint(make([]byte, 0, 16), s.Addr, 16)
		for n := len(hex); n < 16; n++ {
			line = append(line, '0')
		}
		line = append(line, hex...)
		line = append(line, ' ', s.Type, ' ')
		line = append(line, s.Name...)
		if s.Module != "" {
			line = append(line, "\t["...)
			line = append(line, s.Module...)
			line = append(line, ']')
		}
		line = append(line, '\n')
		if _, err := bw.Write(line); err != nil {
			return err
		}
	}
	return bw.Flush()
}
