// Package codearea owns the memory that replacement functions run from in a
// guest kernel: pages of the first MiB of guest RAM (which Linux reserves
// and never allocates) that are verified free, mapped through one page
// table of our own in an unused 2 MiB slot of the kernel-image region, so
// that rel32 jumps and calls reach them from kernel text.
//
// A page is always mapped at Base + its guest-physical address (text
// read-only + executable, data read-write + NX); every other address of
// the slot is unmapped (page 0 and the pages that are not ours are the
// guards). So an address of the slot can only ever translate to one
// physical page, in every life of the area: a translation a vCPU may still
// cache after a release (nothing in the guest flushes our mapping) can
// never lead anywhere else. Rights may differ between lives; a stale
// narrower right faults and the kernel's spurious-fault check retries it.
//
// An allocation header (an unmapped page of the area) records the layout
// and every placed object, so a restarted daemon recovers the area.
package codearea

import (
	"fmt"

	"github.com/hvpatch/hvpatch/introspect"
)

// Options size a new area. A recovered area keeps its recorded size.
type Options struct {
	TextPages int // at most this many RX pages (default 64)
	DataPages int // at most this many RW+NX pages (default 64)
}

// Area is the hypervisor-owned code area of one guest.
type Area struct {
	k *introspect.Kernel

	Base        uint64   // virtual address of the 2 MiB slot
	PMDTable    uint64   // guest-physical address of the kernel-image PMD table (level2_kernel_pgt)
	PMDEntryGPA uint64   // guest-physical address of the slot's entry in it
	PageTable   uint64   // guest-physical address of our page table
	Header      uint64   // guest-physical address of the allocation header
	TextPages   []uint64 // guest-physical pages mapped RX, in address order
	DataPages   []uint64 // guest-physical pages mapped RW+NX, in address order
	Checks      []string // evidence that the pages were free (from the header when recovered)

	// Report is the free-page scan behind a new area; nil when recovered.
	Report *LowMemReport
	// Recovered: the area was found in the guest through its header.
	Recovered bool

	// Waits counts the releases retried because the code was in use.
	Waits int

	threadsFn func(*introspect.AddressSpace) ([]thread, error) // tests: threads without BTF

	mapped  bool // the PMD entry, page table and header are in the guest
	entries []Entry
	// planned are placements planned and not installed yet, in order:
	// their pages are taken for later plans, and each is installed as if
	// those before it were.
	planned []*Placement
}

// plannedEntries lists the entries of the placements planned before p
// (all of them when p is nil) and not installed.
func (a *Area) plannedEntries(p *Placement) []Entry {
	var out []Entry
	for _, q := range a.planned {
		if q == p {
			break
		}
		out = append(out, q.entry)
	}
	return out
}

// TextVA is the virtual address of text page i.
func (a *Area) TextVA(i int) uint64 { return a.Base + a.TextPages[i] }

// DataVA is the virtual address of data page i.
func (a *Area) DataVA(i int) uint64 { return a.Base + a.DataPages[i] }

// Mapped reports whether the area's mapping and header are in the guest
// (there is at least one entry, or a daemon left it so).
func (a *Area) Mapped() bool { return a.mapped }

// Entries lists the placed objects.
func (a *Area) Entries() []Entry { return append([]Entry(nil), a.entries...) }

// Entry finds a placed object by name.
func (a *Area) Entry(name string) (Entry, bool) {
	for _, e := range a.entries {
		if e.Name == name {
			return e, true
		}
	}
	return Entry{}, false
}

// Free returns the bytes not allocated to any entry.
func (a *Area) Free() (text, data uint64) {
	tu, du := a.used()
	for _, u := range tu {
		if !u {
			text += pageSize
		}
	}
	for _, u := range du {
		if !u {
			data += pageSize
		}
	}
	return text, data
}

func (a *Area) used() (text, data []bool) {
	text = make([]bool, len(a.TextPages))
	data = make([]bool, len(a.DataPages))
	for _, e := range append(a.Entries(), a.plannedEntries(nil)...) {
		for i := e.TextPage; i < e.TextPage+e.TextPages; i++ {
			text[i] = true
		}
		for i := e.DataPage; i < e.DataPage+e.DataPages; i++ {
			data[i] = true
		}
	}
	return text, data
}

// Find locates the guest's code area: recovered through its header when
// one is in the first MiB, otherwise planned anew (nothing is written
// until the first Install).
func Find(k *introspect.Kernel) (*Area, error) { return FindWith(k, Options{}) }

// FindWith is Find with sizing options for a new area.
func FindWith(k *introspect.Kernel, opt Options) (*Area, error) {
	if opt.TextPages <= 0 {
		opt.TextPages = 64
	}
	if opt.DataPages <= 0 {
		opt.DataPages = 64
	}
	pmd, err := pmdTableOf(k.Mem, k.CR3, k.LA57, kernelImageStart)
	if err != nil {
		return nil, fmt.Errorf("codearea: the kernel-image region's page table: %w", err)
	}
	// The walk and the kernel's own symbol must agree on which table it is.
	if sym, err := k.Symbols.Addr("level2_kernel_pgt"); err == nil {
		t, err := k.AS.Translate(sym)
		if err != nil {
			return nil, fmt.Errorf("codearea: level2_kernel_pgt at %#x: %w", sym, err)
		}
		if t.GPA != pmd {
			return nil, fmt.Errorf("codearea: the page walk finds the kernel-image PMD table at %#x, but level2_kernel_pgt is at %#x: unknown layout", pmd, t.GPA)
		}
	}
	a := &Area{k: k, PMDTable: pmd}
	h, at, err := findHeader(k)
	if err != nil {
		return nil, err
	}
	if h != nil {
		if err := a.recover(h, at); err != nil {
			return nil, fmt.Errorf("codearea: a code-area header is at guest-physical %#x but the area does not match it: %w (refusing to touch it)", at, err)
		}
		return a, nil
	}
	if err := a.plan(opt); err != nil {
		return nil, err
	}
	return a, nil
}

// findHeader looks for the magic at the start of every page of the first
// MiB.
func findHeader(k *introspect.Kernel) (*header, uint64, error) {
	page := make([]byte, pageSize)
	for p := uint64(pageSize); p < lowMemEnd; p += pageSize {
		if err := k.Mem.ReadPhys(p, page[:len(headerMagic)]); err != nil {
			return nil, 0, fmt.Errorf("codearea: reading guest-physical %#x: %w", p, err)
		}
		if !isHeader(page) {
			continue
		}
		if err := k.Mem.ReadPhys(p, page); err != nil {
			return nil, 0, err
		}
		h, err := decodeHeader(page)
		if err != nil {
			return nil, 0, fmt.Errorf("codearea: code-area header at guest-physical %#x: %w", p, err)
		}
		if h.KernelText != k.TextStart {
			// Left by an earlier boot (RAM survives a reset): not ours to
			// recover. Its pages are not zero, so the scan will not pick them.
			continue
		}
		return h, p, nil
	}
	return nil, 0, nil
}

// slotIndex is the PMD index of a kernel-image-region address.
func slotIndex(va uint64) uint64 { return (va - kernelImageStart) / pmdSpan }

// plan picks the slot and the pages of a new area.
func (a *Area) plan(opt Options) error {
	k := a.k
	slot, err := a.freeSlot()
	if err != nil {
		return err
	}
	rep, err := ScanLowMemory(k)
	if err != nil {
		return err
	}
	free := rep.Free
	if len(free) < 4 {
		return fmt.Errorf("codearea: only %d free pages in the first MiB (need 4: header, page table, one text and one data page)\n%s",
			len(free), rep.Summary())
	}
	a.Base = kernelImageStart + slot*pmdSpan
	a.PMDEntryGPA = a.PMDTable + slot*8
	a.Header, a.PageTable = free[0], free[1]
	rest := free[2:]
	nt := max(1, min(opt.TextPages, (len(rest)-1)/2))
	a.TextPages = append([]uint64(nil), rest[:nt]...)
	rest = rest[nt:]
	if len(rest) > 1 && rest[0] == a.TextPages[nt-1]+pageSize {
		rest = rest[1:] // left unmapped: a guard between text and data
	}
	a.DataPages = append([]uint64(nil), rest[:min(opt.DataPages, len(rest))]...)
	a.Checks = rep.Checks
	a.Report = rep
	return nil
}

// freeSlot picks an unused 2 MiB slot of the kernel-image region: its PMD
// entry zero, not within the image, one empty slot away from it. The first
// one after the image is preferred (the same one every time).
func (a *Area) freeSlot() (uint64, error) {
	k := a.k
	raw := make([]byte, pageSize)
	if err := k.Mem.ReadPhys(a.PMDTable, raw); err != nil {
		return 0, fmt.Errorf("codearea: reading the kernel-image PMD table: %w", err)
	}
	if k.TextStart < kernelImageStart || k.TextEnd > kernelImageEnd || k.TextEnd <= k.TextStart {
		return 0, fmt.Errorf("codearea: kernel image %#x-%#x is not inside the kernel-image region", k.TextStart, k.TextEnd)
	}
	first := slotIndex(k.TextStart)
	last := slotIndex(k.TextEnd - 1)
	zero := func(i int) bool { return readLE(raw[i*8:]) == 0 }
	for i := int(last) + 2; i < 512; i++ {
		if zero(i) {
			return uint64(i), nil
		}
	}
	for i := int(first) - 2; i >= 0; i-- {
		if zero(i) {
			return uint64(i), nil
		}
	}
	return 0, fmt.Errorf("codearea: no unused 2 MiB slot in the kernel-image region (image %#x-%#x)", k.TextStart, k.TextEnd)
}

func readLE(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

// recover adopts an area described by a header found at gpa, after
// checking the guest's PMD entry and page table against it.
func (a *Area) recover(h *header, gpa uint64) error {
	if h.Base < kernelImageStart || h.Base >= kernelImageEnd || h.Base%pmdSpan != 0 {
		return fmt.Errorf("base %#x is not a slot of the kernel-image region", h.Base)
	}
	if want := a.PMDTable + slotIndex(h.Base)*8; h.PMDEntry != want {
		return fmt.Errorf("PMD entry recorded at %#x, the slot's entry is at %#x", h.PMDEntry, want)
	}
	if len(h.Text) == 0 || len(h.Data) == 0 || len(h.Text) > maxAreaPages || len(h.Data) > maxAreaPages {
		return fmt.Errorf("%d text and %d data pages: not a valid layout", len(h.Text), len(h.Data))
	}
	seen := map[uint64]bool{}
	for li, list := range [][]uint64{{h.PageTable, gpa}, h.Text, h.Data} {
		for i, p := range list {
			if p%pageSize != 0 || p == 0 || p >= lowMemEnd || seen[p] || (li > 0 && i > 0 && p < list[i-1]) {
				return fmt.Errorf("page %#x: not a valid layout (pages are distinct, ascending, in the first MiB)", p)
			}
			seen[p] = true
		}
	}
	a.Base, a.PMDEntryGPA, a.PageTable, a.Header = h.Base, h.PMDEntry, h.PageTable, gpa
	a.TextPages, a.DataPages, a.Checks = h.Text, h.Data, h.Checks
	a.entries = h.Entries
	a.Recovered, a.mapped = true, true
	pmdE, err := readU64(a.k.Mem, a.PMDEntryGPA)
	if err != nil {
		return err
	}
	if want := entry(a.PageTable, pmdTable); pmdE != want {
		return fmt.Errorf("PMD entry is %#x, expected %#x", pmdE, want)
	}
	pt := make([]byte, pageSize)
	if err := a.k.Mem.ReadPhys(a.PageTable, pt); err != nil {
		return err
	}
	want := a.pageTable()
	for i := 0; i < pageSize; i += 8 {
		if got, w := readLE(pt[i:]), readLE(want[i:]); got != w {
			return fmt.Errorf("page table entry %d is %#x, expected %#x", i/8, got, w)
		}
	}
	tu, du := make([]bool, len(a.TextPages)), make([]bool, len(a.DataPages))
	names := map[string]bool{}
	for _, e := range a.entries {
		if err := e.check(len(tu), len(du)); err != nil {
			return fmt.Errorf("entry %q has pages outside the area: %w", e.Name, err)
		}
		if names[e.Name] {
			return fmt.Errorf("entry %q is recorded twice", e.Name)
		}
		names[e.Name] = true
		for i := e.TextPage; i < e.TextPage+e.TextPages; i++ {
			if tu[i] {
				return fmt.Errorf("entry %q overlaps another", e.Name)
			}
			tu[i] = true
		}
		for i := e.DataPage; i < e.DataPage+e.DataPages; i++ {
			if du[i] {
				return fmt.Errorf("entry %q overlaps another", e.Name)
			}
			du[i] = true
		}
	}
	return nil
}

// pageTable is the content of our page table: every text and data page
// mapped, the guards and the rest of the slot not.
func (a *Area) pageTable() []byte {
	pt := make([]byte, pageSize)
	for _, gpa := range a.TextPages {
		copy(pt[gpa/pageSize*8:], putU64(entry(gpa, pteText)))
	}
	for _, gpa := range a.DataPages {
		copy(pt[gpa/pageSize*8:], putU64(entry(gpa, pteData)))
	}
	return pt
}

// headerPage encodes the area with the given entries.
func (a *Area) headerPage(entries []Entry) ([]byte, error) {
	h := &header{Version: headerVersion, KernelText: a.k.TextStart, Base: a.Base, PMDEntry: a.PMDEntryGPA, PageTable: a.PageTable,
		Text: a.TextPages, Data: a.DataPages, Checks: a.Checks, Entries: entries}
	return h.encode()
}

// directVA is the kernel's direct-map alias of a guest-physical address:
// mapped in every kernel page table whether or not the area is.
func (a *Area) directVA(gpa uint64) uint64 { return a.k.DirectMapBase + gpa }
