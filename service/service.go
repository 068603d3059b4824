// Package service is what hvpatch answers about a guest, computed once for
// both ways of asking: the CLI run standalone calls these functions itself,
// hvpatchd calls them for its API and sends the result structs as JSON, and
// the CLI in client mode decodes them and prints them with the same Text
// methods. The same output either way follows by construction.
package service

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// Domains is the domain list.
type Domains []hypervisor.DomainInfo

// Listed is the list virsh list prints: the active domains (those with an
// id) by id, then with all the inactive ones by name.
func (ds Domains) Listed(all bool) Domains {
	out := Domains{}
	for _, d := range ds {
		if all || d.ID > 0 {
			out = append(out, d)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if (a.ID > 0) != (b.ID > 0) {
			return a.ID > 0
		}
		if a.ID > 0 && a.ID != b.ID {
			return a.ID < b.ID
		}
		return a.Name < b.Name
	})
	return out
}

func (ds Domains) WriteText(w io.Writer) error {
	rows := make([][]string, len(ds))
	for i, d := range ds {
		id := "-"
		if d.ID > 0 {
			id = strconv.Itoa(d.ID)
		}
		rows[i] = []string{id, Escape(d.Name), Escape(d.State), Escape(d.UUID)}
	}
	return Table(w, []string{"id", "name", "state", "uuid"}, rows)
}

// Info describes a guest kernel.
type Info struct {
	Source  string `json:"source"`
	Release string `json:"release"`
	Banner  string `json:"banner"`
	Text    string `json:"text"`
	End     string `json:"end"`
	Slide   string `json:"slide"`
	// TextPhys is the guest-physical address of _text; PhysBase is the
	// kernel's phys_base variable (what __pa_symbol adds, and what crash
	// takes as phys_base): _text's physical address minus its link-time
	// offset from __START_KERNEL_map, which is 16 MiB less than TextPhys
	// on a default x86-64 build without KASLR.
	TextPhys      string  `json:"text_phys"`
	PhysBase      string  `json:"phys_base"`
	DirectMapBase string  `json:"direct_map_base"`
	Paging        string  `json:"paging"`
	CR3           string  `json:"cr3"`
	Symbols       int     `json:"symbols"`
	BTF           bool    `json:"btf"`
	AttachMS      float64 `json:"attach_ms"`
	Timings       string  `json:"timings"`
}

// startKernelMap is __START_KERNEL_map, where the x86-64 kernel image is
// linked (virtual = physical - phys_base + __START_KERNEL_map).
const startKernelMap = 0xffffffff80000000

// PhysBase is the kernel's phys_base variable, read from guest memory; a
// kernel whose symbol is missing or unreadable gets the value the kernel
// computes it as (the physical minus the link-time offset of _text).
func PhysBase(k *introspect.Kernel) uint64 {
	if a, err := k.Symbols.Addr("phys_base"); err == nil {
		if v, err := k.AS.ReadUint64(a); err == nil {
			return v
		}
	}
	return k.PhysBase - (k.TextStart - startKernelMap)
}

// KernelInfo describes k, found in source (a domain or a dump file).
func KernelInfo(source string, k *introspect.Kernel) Info {
	return Info{
		Source: source, Release: k.Release, Banner: k.Banner,
		Text: HexAddr(k.TextStart), End: HexAddr(k.TextEnd), Slide: HexAddr(k.Slide),
		TextPhys: HexAddr(k.PhysBase), PhysBase: HexAddr(PhysBase(k)),
		DirectMapBase: HexAddr(k.DirectMapBase), Paging: k.PagingMode(), CR3: HexAddr(k.CR3),
		Symbols: k.Symbols.Len(), BTF: k.BTF != nil,
		AttachMS: float64(k.AttachTime.Microseconds()) / 1000, Timings: k.Timings.String(),
	}
}

func (r Info) WriteText(w io.Writer) error {
	yes := map[bool]string{true: "yes", false: "no"}
	attach := time.Duration(math.Round(r.AttachMS*1000)) * time.Microsecond
	rows := [][2]string{
		{"Source", Escape(r.Source)}, {"Release", Escape(r.Release)}, {"Banner", Escape(r.Banner)},
		{"Kernel image", r.Text + "-" + r.End},
		{"KASLR slide", r.Slide}, {"_text physical", r.TextPhys}, {"phys_base", r.PhysBase},
		{"Direct map", r.DirectMapBase}, {"Paging", r.Paging}, {"CR3", r.CR3},
		{"Symbols", fmt.Sprint(r.Symbols)}, {"BTF", yes[r.BTF]},
		{"Attach time", fmt.Sprintf("%v (%s)", attach.Round(10*time.Microsecond), r.Timings)},
	}
	for _, row := range rows {
		if _, err := fmt.Fprintf(w, "%-15s %s\n", row[0]+":", row[1]); err != nil {
			return err
		}
	}
	return nil
}

// Symbol is one kernel symbol.
type Symbol struct {
	Name   string `json:"name"`
	Addr   string `json:"addr"`
	Type   string `json:"type"`
	Module string `json:"module,omitempty"`
}

// SymbolInfo is one symbol as "sym" shows it: always the same fields.
type SymbolInfo struct {
	Name   string `json:"name"`
	Addr   string `json:"addr"`
	Type   string `json:"type"`
	Module string `json:"module,omitempty"`
	// Offset is the looked-up address minus the symbol's (0 for a name).
	Offset uint64 `json:"offset"`
	// GapToNext is how far the next symbol is: the next function symbol
	// for code, the next symbol of any kind otherwise. kallsyms records no
	// sizes: this is an upper bound of the size, not the size.
	GapToNext uint64 `json:"gap_to_next"`
	// Aliases are the other symbols at the same address.
	Aliases []string `json:"aliases"`
}

func symbolInfo(t *symbols.Table, s symbols.Symbol) SymbolInfo {
	j := SymbolInfo{Name: s.Name, Addr: HexAddr(s.Addr), Type: string(s.Type), Module: s.Module, Aliases: []string{}}
	all := t.All()
	i := sort.Search(len(all), func(i int) bool { return all[i].Addr >= s.Addr })
	// A guest may put any number of symbols at one address (85,000 made
	// a list search per alias take seconds): each name is looked up once.
	seen := map[string]bool{s.Name: true}
	for ; i < len(all) && all[i].Addr == s.Addr; i++ {
		if !seen[all[i].Name] {
			seen[all[i].Name] = true
			j.Aliases = append(j.Aliases, all[i].Name)
		}
	}
	if symbols.IsText(s.Type) {
		j.GapToNext = t.FunctionSize(s)
	} else if i < len(all) {
		j.GapToNext = all[i].Addr - s.Addr
	}
	return j
}

// SymLookup is the answer to "sym": the symbol holding an address
// (ByAddr, with Offset) or every symbol of a name; one shape either way.
type SymLookup struct {
	Query   string       `json:"query"`
	ByAddr  bool         `json:"by_addr"`
	Symbols []SymbolInfo `json:"symbols"`
}

// JSON is what --json prints: the lookup, the same shape for an address
// and a name.
func (r SymLookup) JSON() any { return r }

func (r SymLookup) WriteText(w io.Writer) error {
	for _, s := range r.Symbols {
		addr, _ := strconv.ParseUint(s.Addr, 0, 64)
		mod := ""
		if s.Module != "" {
			mod = "\t[" + Escape(s.Module) + "]"
		}
		var notes []string
		if !r.ByAddr && s.GapToNext > 0 {
			notes = append(notes, fmt.Sprintf("next symbol %#x bytes on", s.GapToNext))
		}
		if len(s.Aliases) > 0 {
			a := make([]string, len(s.Aliases))
			for i, n := range s.Aliases {
				a[i] = Escape(n)
			}
			notes = append(notes, "aliases: "+strings.Join(a, ", "))
		}
		note := ""
		if len(notes) > 0 {
			note = " (" + strings.Join(notes, "; ") + ")"
		}
		var err error
		if r.ByAddr {
			_, err = fmt.Fprintf(w, "%016x %s %s+%#x%s%s\n", addr+s.Offset, Escape(s.Type), Escape(s.Name), s.Offset, mod, note)
		} else {
			_, err = fmt.Fprintf(w, "%016x %s %s%s%s\n", addr, Escape(s.Type), Escape(s.Name), mod, note)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// ParseAddr reports whether s is an address rather than a symbol name:
// anything that parses as a number (0x… hex, 0o/0b, decimal, with _
// separators) is one, and so is a string of hex digits without 0x (as
// crash takes them) that names no symbol.
func ParseAddr(k *introspect.Kernel, s string) (uint64, bool) {
	if v, err := strconv.ParseUint(strings.ReplaceAll(s, "_", ""), 0, 64); err == nil {
		return v, true
	}
	if s == "" || len(s) > 16 || strings.Trim(strings.ToLower(s), "0123456789abcdef") != "" {
		return 0, false
	}
	if k != nil && len(k.Symbols.Lookup(s)) > 0 {
		return 0, false
	}
	v, err := strconv.ParseUint(s, 16, 64)
	return v, err == nil
}

// Sym looks up a name, or for an address (see ParseAddr) the symbol
// holding it.
func Sym(source string, k *introspect.Kernel, q string) (SymLookup, error) {
	if addr, ok := ParseAddr(k, q); ok {
		tab := k.Symbols
		s, off, ok := ResolveAddr(k, addr)
		if !ok && (addr < k.TextStart || addr >= k.TextEnd) {
			tab = moduleTable(k)
			s, off, ok = resolveModuleAddr(tab, addr)
		}
		if !ok {
			return SymLookup{}, fmt.Errorf("%s: no symbol holds address %#x", source, addr)
		}
		j := symbolInfo(tab, s)
		j.Offset = off
		return SymLookup{Query: q, ByAddr: true, Symbols: []SymbolInfo{j}}, nil
	}
	tab := k.Symbols
	found := tab.Lookup(q)
	if len(found) == 0 {
		if mt := moduleTable(k); mt != nil {
			tab, found = mt, mt.Lookup(q)
		}
	}
	if len(found) == 0 {
		return SymLookup{}, fmt.Errorf("%s: no symbol %q in the guest kernel (%s) or its loaded modules", source, q, k.Release)
	}
	out := SymLookup{Query: q, Symbols: []SymbolInfo{}}
	for _, s := range found {
		out.Symbols = append(out.Symbols, symbolInfo(tab, s))
	}
	return out, nil
}

// SymbolList is the answer to "syms": symbols in address order, without
// sizes, printed like /proc/kallsyms.
type SymbolList []Symbol

func (l SymbolList) WriteText(w io.Writer) error {
	// In list order, as /proc/kallsyms: the image's symbols by address,
	// then each module's in its own symbol-table order.
	bw := bufio.NewWriterSize(w, 1<<16)
	for _, s := range l {
		addr, _ := strconv.ParseUint(s.Addr, 0, 64)
		var typ byte = '?'
		if s.Type != "" && s.Type[0] > ' ' && s.Type[0] < 0x7f {
			typ = s.Type[0]
		}
		fmt.Fprintf(bw, "%016x %c %s", addr, typ, Escape(s.Name))
		if s.Module != "" {
			fmt.Fprintf(bw, "\t[%s]", Escape(s.Module))
		}
		bw.WriteByte('\n')
	}
	return bw.Flush()
}

// Syms lists the kernel's symbols, those whose name matches grep when it is
// not empty.
func Syms(k *introspect.Kernel, grep string) (SymbolList, error) {
	var re *regexp.Regexp
	if grep != "" {
		var err error
		if re, err = regexp.Compile(grep); err != nil {
			return nil, fmt.Errorf("--grep %q: %w", grep, err)
		}
	}
	out := SymbolList{}
	for _, s := range append(k.Symbols.All(), moduleSymbols(k)...) {
		if re == nil || re.MatchString(s.Name) {
			out = append(out, Symbol{Name: s.Name, Addr: HexAddr(s.Addr), Type: string(s.Type), Module: s.Module})
		}
	}
	return out, nil
}

// ResolveAddr is Table.Resolve limited to where symbols are dense: inside
// the kernel image, or among the zero-based per-CPU (absolute) symbols.
// Elsewhere the nearest symbol below is meaningless.
func ResolveAddr(k *introspect.Kernel, addr uint64) (symbols.Symbol, uint64, bool) {
	s, off, ok := k.Symbols.Resolve(addr)
	if !ok {
		return s, off, false
	}
	if s.Addr >= k.TextStart {
		return s, off, addr < k.TextEnd
	}
	return s, off, s.Type != 'A' && s.Type != 'a' || off < 1<<20
}

// ResolveTarget turns SYMBOL, SYMBOL+OFF or ADDR into an address; anything
// that parses as an address (see ParseAddr) is one, so 0 is address 0.
func ResolveTarget(k *introspect.Kernel, s string) (uint64, error) {
	if v, ok := ParseAddr(k, s); ok {
		return v, nil
	}
	name, offStr, hasOff := strings.Cut(s, "+")
	addr, err := k.Symbols.Addr(name)
	if err != nil {
		// A module symbol (the module's own table), when the image has none.
		mt := moduleTable(k)
		if mt == nil || len(mt.Lookup(name)) == 0 {
			return 0, err
		}
		if addr, err = mt.Addr(name); err != nil {
			return 0, err
		}
	}
	if hasOff {
		off, err := strconv.ParseUint(offStr, 0, 64)
		if err != nil {
			return 0, fmt.Errorf("offset %q in %q: %w", offStr, s, err)
		}
		addr += off
	}
	return addr, nil
}

// Task is one guest process.
type Task struct {
	PID          int    `json:"pid"`
	PPID         int    `json:"ppid"`
	State        string `json:"state"`
	Comm         string `json:"comm"`
	Task         string `json:"task"`
	StackPointer string `json:"stack_pointer"`
}

// Tasks is the answer to "ps".
type Tasks []Task

func Ps(source string, k *introspect.Kernel) (Tasks, error) {
	tasks, err := k.Tasks()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	// The task list holds CPU 0's idle task (init_task) only: the other
	// CPUs' follow it, PID 0 each, as crash's ps lists them.
	if idle, err := k.IdleTasks(); err == nil && len(idle) > 1 && len(tasks) > 0 {
		tasks = append(append(tasks[:1:1], idle[1:]...), tasks[1:]...)
	}
	out := make(Tasks, 0, len(tasks))
	for _, t := range tasks {
		out = append(out, Task{PID: t.PID, PPID: t.PPID, State: t.StateLetter(), Comm: t.Comm,
			Task: HexAddr(t.Addr), StackPointer: HexAddr(t.StackPointer)})
	}
	return out, nil
}

func (ts Tasks) WriteText(w io.Writer) error {
	rows := make([][]string, 0, len(ts))
	for _, t := range ts {
		rows = append(rows, []string{fmt.Sprint(t.PID), fmt.Sprint(t.PPID), Escape(t.State), Escape(t.Comm), Escape(t.Task)})
	}
	return Table(w, []string{"pid", "ppid", "s", "comm", "task"}, rows)
}

// Module is one loaded kernel module.
type Module struct {
	Name string `json:"name"`
	Size uint64 `json:"size"`
	Base string `json:"base"`
}

// Modules is the answer to "lsmod".
type Modules []Module

func Lsmod(source string, k *introspect.Kernel) (Modules, error) {
	mods, err := k.Modules()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	out := make(Modules, 0, len(mods))
	for _, m := range mods {
		out = append(out, Module{Name: m.Name, Size: m.Size, Base: HexAddr(m.Base)})
	}
	return out, nil
}

func (ms Modules) WriteText(w io.Writer) error {
	rows := make([][]string, 0, len(ms))
	for _, m := range ms {
		rows = append(rows, []string{Escape(m.Name), fmt.Sprint(m.Size), Escape(m.Base)})
	}
	return Table(w, []string{"module", "size", "base"}, rows)
}

// HexAddr formats an address the way every command prints addresses.
func HexAddr(v uint64) string { return fmt.Sprintf("%#x", v) }

// Table writes aligned columns under upper-case headers.
func Table(w io.Writer, headers []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.ToUpper(strings.Join(headers, "\t")))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// HexDump prints 16 bytes a line: address, bytes, printable characters.
func HexDump(w io.Writer, addr uint64, b []byte) error {
	for off := 0; off < len(b); off += 16 {
		line := b[off:min(off+16, len(b))]
		var hx, asc strings.Builder
		for i := 0; i < 16; i++ {
			if i == 8 {
				hx.WriteByte(' ')
			}
			if i < len(line) {
				fmt.Fprintf(&hx, "%02x ", line[i])
				c := line[i]
				if c < 0x20 || c > 0x7e {
					c = '.'
				}
				asc.WriteByte(c)
			} else {
				hx.WriteString("   ")
			}
		}
		if _, err := fmt.Fprintf(w, "%016x  %s |%s|\n", addr+uint64(off), hx.String(), asc.String()); err != nil {
			return err
		}
	}
	return nil
}

func decodeHex(s string) []byte {
	b, _ := hex.DecodeString(s)
	return b
}
