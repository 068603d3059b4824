package codearea

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
)

// Placement is an object linked for a place in the area; nothing is in the
// guest until Install.
type Placement struct {
	Name           string // the entry's name (the entry symbol, unless PlanNamed)
	Image          *linker.Image
	TextVA, DataVA uint64
	// Site, if the caller sets it before Install, is the address of the
	// jump that will lead to Image.Entry; it is recorded in the header and
	// Release refuses while it still jumps here.
	Site uint64

	area  *Area
	entry Entry
}

// PageWrite is one write Install or Release makes: guest-physical address,
// the direct-map alias the gdbstub writer uses, old and new bytes.
type PageWrite struct {
	What string
	VA   uint64 // virtual address the write is made through
	GPA  uint64
	Old  []byte // what must be there before
	New  []byte
}

// Plan allocates room for obj and links it there; nothing is written.
// Every problem of the object (unresolved symbols, unsupported relocations,
// sections too large for the free space) is an error here.
func (a *Area) Plan(obj *linker.Object, entry string, resolve linker.Resolver, opt linker.Options) (*Placement, error) {
	return a.PlanNamed(obj, entry, entry, resolve, opt)
}

// PlanNamed is Plan for an area entry called name, which need not be the
// entry symbol (an object holding several replacement functions).
func (a *Area) PlanNamed(obj *linker.Object, name, entry string, resolve linker.Resolver, opt linker.Options) (*Placement, error) {
	if _, dup := a.Entry(name); dup {
		return nil, fmt.Errorf("codearea: %q is already placed in the area", name)
	}
	textSize, dataSize := obj.Size()
	textAlign, dataAlign := obj.Align()
	if textAlign > pageSize || dataAlign > pageSize {
		return nil, fmt.Errorf("codearea: section alignment %d/%d is larger than a page", textAlign, dataAlign)
	}
	tu, du := a.used()
	ti, tn := fit(tu, a.TextPages, pages(textSize))
	di, dn := fit(du, a.DataPages, pages(dataSize))
	lay := linker.Layout{
		TextBase: a.TextVA(ti), TextLimit: uint64(tn) * pageSize,
		DataBase: a.DataVA(di), DataLimit: uint64(dn) * pageSize,
	}
	img, err := obj.LinkWithOptions(entry, lay, resolve, opt)
	if err != nil {
		return nil, fmt.Errorf("codearea: linking %s into the code area (free: %d text, %d data pages): %w", entry, countFree(tu), countFree(du), err)
	}
	if len(img.Text) == 0 {
		return nil, fmt.Errorf("codearea: %s has no code", entry)
	}
	e := Entry{
		Name:     name,
		TextPage: ti, TextPages: pages(uint64(len(img.Text))),
		DataPage: di, DataPages: pages(uint64(len(img.Data))),
		TextSize: uint64(len(img.Text)), DataSize: uint64(len(img.Data)),
		Entry:   img.Entry,
		TextCRC: crc32.ChecksumIEEE(img.Text),
	}
	p := &Placement{Name: name, Image: img, TextVA: lay.TextBase, DataVA: lay.DataBase, area: a, entry: e}
	a.planned = append(a.planned, p)
	return p, nil
}

func pages(n uint64) int { return int((n + pageSize - 1) / pageSize) }

// fit finds the first run of n free, physically (hence virtually)
// contiguous pages (first-fit); if there is none, the largest run, so that
// the linker reports the size against it.
func fit(used []bool, gpas []uint64, n int) (start, length int) {
	bestStart, bestLen := 0, 0
	for i := 0; i < len(used); {
		if used[i] {
			i++
			continue
		}
		j := i + 1
		for j < len(used) && !used[j] && gpas[j] == gpas[j-1]+pageSize {
			j++
		}
		if j-i >= n {
			return i, j - i
		}
		if j-i > bestLen {
			bestStart, bestLen = i, j-i
		}
		i = j
	}
	return bestStart, bestLen
}

func countFree(used []bool) int {
	n := 0
	for _, u := range used {
		if !u {
			n++
		}
	}
	return n
}

// installWrites lists the writes of an Install, in order: the new code and
// data, then (for a new area) the page table and the PMD entry, last the
// header. Nothing reaches the new code before the header says it is there,
// and nothing jumps to it before Install returns.
func (a *Area) installWrites(p *Placement) ([]PageWrite, []Entry, error) {
	zero := make([]byte, pageSize)
	e := p.entry
	e.Site = p.Site
	var ws []PageWrite
	for i := 0; i < e.TextPages; i++ {
		page := make([]byte, pageSize)
		copy(page, p.Image.Text[i*pageSize:])
		gpa := a.TextPages[e.TextPage+i]
		ws = append(ws, PageWrite{fmt.Sprintf("text page %d", e.TextPage+i), a.directVA(gpa), gpa, zero, page})
	}
	for i := 0; i < e.DataPages; i++ {
		page := make([]byte, pageSize)
		copy(page, p.Image.Data[i*pageSize:])
		gpa := a.DataPages[e.DataPage+i]
		ws = append(ws, PageWrite{fmt.Sprintf("data page %d", e.DataPage+i), a.directVA(gpa), gpa, zero, page})
	}
	// Placements planned before p are installed before it: its writes
	// start from the area as they leave it.
	before := append(a.Entries(), a.plannedEntries(p)...)
	entries := append(slices.Clip(before), e)
	hdr, err := a.headerPage(entries)
	if err != nil {
		return nil, nil, err
	}
	oldHdr := zero
	if a.mapped || len(before) > len(a.entries) {
		if oldHdr, err = a.headerPage(before); err != nil {
			return nil, nil, err
		}
	} else {
		ws = append(ws,
			PageWrite{"page table", a.directVA(a.PageTable), a.PageTable, zero, a.pageTable()},
			PageWrite{"PMD entry", a.directVA(a.PMDEntryGPA), a.PMDEntryGPA, make([]byte, 8), putU64(entry(a.PageTable, pmdTable))})
	}
	ws = append(ws, PageWrite{"allocation header", a.directVA(a.Header), a.Header, oldHdr, hdr})
	return ws, entries, nil
}

// Writes lists what Install would write (for a dry run).
func (p *Placement) Writes() ([]PageWrite, error) {
	ws, _, err := p.area.installWrites(p)
	return ws, err
}

// Install writes the placement under one stop of the guest and verifies
// it: read back through the writer, and through a fresh walk of the
// guest's own page tables (the mapping and the rights of every area page,
// and the content of the new pages). Any failure restores what was written.
func (a *Area) Install(ctx context.Context, w hypervisor.CodeWriter, p *Placement) error {
	sg, err := w.Stop(ctx)
	if err != nil {
		return err
	}
	err = a.InstallStopped(sg, p)
	if _, rerr := sg.Resume(); rerr != nil {
		return errors.Join(err, rerr)
	}
	return err
}

// InstallStopped is Install inside a stop the caller holds (for instance to
// put the entry jump in the same stop, after this returns nil).
func (a *Area) InstallStopped(sg hypervisor.StoppedGuest, p *Placement) error {
	if p.area != a {
		return errors.New("codearea: placement belongs to another area")
	}
	if pending := a.plannedEntries(p); len(pending) > 0 {
		return fmt.Errorf("codearea: %s was planned after %s, which is not installed: install placements in the order planned", p.Name, pending[0].Name)
	}
	ws, entries, err := a.installWrites(p)
	if err != nil {
		return err
	}
	if err := apply(sg, ws); err != nil {
		return fmt.Errorf("codearea: installing %s: %w", p.Name, err)
	}
	wasMapped := a.mapped
	a.mapped, a.entries = true, entries
	if err := a.verify(sg, &p.entry, p.Image); err != nil {
		a.mapped, a.entries = wasMapped, entries[:len(entries)-1]
		return errors.Join(fmt.Errorf("codearea: installing %s: %w", p.Name, err), undo(sg, ws, len(ws)))
	}
	a.planned = slices.DeleteFunc(a.planned, func(q *Placement) bool { return q == p })
	return nil
}

// apply checks every old value, then writes and reads back each in turn;
// on a failure it restores what it wrote.
func apply(sg hypervisor.StoppedGuest, ws []PageWrite) error {
	for _, w := range ws {
		cur := make([]byte, len(w.Old))
		if err := sg.Read(w.VA, w.GPA, cur); err != nil {
			return fmt.Errorf("%s at %#x: %w", w.What, w.GPA, err)
		}
		if !bytes.Equal(cur, w.Old) {
			return fmt.Errorf("%s at guest-physical %#x is not what it should be before the write (%s): nothing written",
				w.What, w.GPA, diffAt(cur, w.Old))
		}
	}
	for i, w := range ws {
		err := sg.Write(w.VA, w.GPA, w.New)
		if err == nil {
			back := make([]byte, len(w.New))
			if err = sg.Read(w.VA, w.GPA, back); err == nil && !bytes.Equal(back, w.New) {
				err = fmt.Errorf("read back differs (%s)", diffAt(back, w.New))
			}
		}
		if err != nil {
			return errors.Join(fmt.Errorf("%s at %#x: %w", w.What, w.GPA, err), undo(sg, ws, i+1))
		}
	}
	return nil
}

// undo writes the old bytes of the first n writes back, last first.
func undo(sg hypervisor.StoppedGuest, ws []PageWrite, n int) error {
	var errs []error
	for i := n - 1; i >= 0; i-- {
		if err := sg.Write(ws[i].VA, ws[i].GPA, ws[i].Old); err != nil {
			errs = append(errs, fmt.Errorf("restoring %s at %#x: %w", ws[i].What, ws[i].GPA, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("codearea: GUEST MEMORY LEFT CHANGED: %w", errors.Join(errs...))
	}
	return nil
}

func diffAt(got, want []byte) string {
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("byte %d is %#02x, expected %#02x", i, got[i], want[i])
		}
	}
	return "equal"
}

// verify walks the guest's page tables afresh and checks every page of the
// area: mapped to its recorded physical page with its rights, and, for the
// entry just written, the content, also read through the writer at the
// area's own addresses (the gdbstub reads through the guest's MMU).
func (a *Area) verify(sg hypervisor.StoppedGuest, e *Entry, img *linker.Image) error {
	as := introspect.NewAddressSpace(a.k.Mem, a.k.CR3, a.k.LA57)
	if err := a.checkMapping(as); err != nil {
		return err
	}
	check := func(what string, va0 uint64, data []byte) error {
		for off := 0; off < len(data); off += pageSize {
			va := va0 + uint64(off)
			t, err := as.Translate(va)
			if err != nil {
				return err
			}
			want := data[off:min(off+pageSize, len(data))]
			got := make([]byte, len(want))
			if err := a.k.Mem.ReadPhys(t.GPA, got); err != nil {
				return err
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("%s at %#x (walked to %#x): %s", what, va, t.GPA, diffAt(got, want))
			}
			if err := sg.Read(va, t.GPA, got); err != nil {
				return fmt.Errorf("%s at %#x through the writer: %w", what, va, err)
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("%s at %#x through the writer: %s", what, va, diffAt(got, want))
			}
		}
		return nil
	}
	if err := check("text", a.TextVA(e.TextPage), img.Text); err != nil {
		return err
	}
	return check("data", a.DataVA(e.DataPage), img.Data)
}

// CheckMapping verifies, through the page tables rooted at as, that every
// page of the area translates to its own physical page with its rights
// (text: read-only, executable, supervisor; data: writable, NX,
// supervisor) and that the guard pages do not translate.
func (a *Area) CheckMapping(as *introspect.AddressSpace) error { return a.checkMapping(as) }

func (a *Area) checkMapping(as *introspect.AddressSpace) error {
	want := map[uint64]bool{} // gpa -> text?
	for _, p := range a.TextPages {
		want[p] = true
	}
	for _, p := range a.DataPages {
		want[p] = false
	}
	// Every page of the slot's first MiB: ours at Base + gpa with their
	// rights, everything else unmapped; the rest of the slot unmapped.
	for off := uint64(0); off < pmdSpan; off += pageSize {
		va := a.Base + off
		t, err := as.Translate(va)
		text, ours := want[off]
		if !ours {
			if err == nil {
				return fmt.Errorf("%#x is mapped (to %#x) but is not a page of the area", va, t.GPA)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("area page %#x: %w", va, err)
		}
		if t.GPA != off || t.PageSize != pageSize || t.Writable == text || t.NX == text || t.User {
			return fmt.Errorf("area page %#x maps %#x (%d bytes, writable %v, NX %v, user %v), expected %#x %s, supervisor",
				va, t.GPA, t.PageSize, t.Writable, t.NX, t.User, off, map[bool]string{true: "read-only executable", false: "writable NX"}[text])
		}
	}
	return nil
}

// Release removes a placed object under one stop of the guest: its pages
// are zeroed and its header entry dropped; when it was the last, the PMD
// entry is cleared first, then the page table and the header, and the
// guest's memory is as it was before the area existed. The jump to the
// object must have been removed before, in an earlier stop: Release
// refuses while the recorded site still jumps into the object. While a
// vCPU or a thread's stack still holds an address in the object (see
// inUse), it lets the guest run and tries again, up to wait.
func (a *Area) Release(ctx context.Context, w hypervisor.CodeWriter, name string) error {
	return a.ReleaseWait(ctx, w, name, 2*time.Second)
}

// ReleaseWait is Release with its own bound on waiting for the object to
// fall out of use.
func (a *Area) ReleaseWait(ctx context.Context, w hypervisor.CodeWriter, name string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		sg, err := w.Stop(ctx)
		if err != nil {
			return err
		}
		err = a.ReleaseStopped(sg, name)
		if _, rerr := sg.Resume(); rerr != nil {
			return errors.Join(err, rerr)
		}
		var busy *InUseError
		if !errors.As(err, &busy) || time.Now().After(deadline) {
			return err
		}
		a.Waits++
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// ReleaseStopped is Release inside a stop the caller holds.
func (a *Area) ReleaseStopped(sg hypervisor.StoppedGuest, name string) error {
	var e Entry
	var rest []Entry
	found := false
	for _, x := range a.entries {
		if x.Name == name && !found {
			e, found = x, true
			continue
		}
		rest = append(rest, x)
	}
	if !found {
		return fmt.Errorf("codearea: %q is not in the area", name)
	}
	// Entries come from a header in guest memory: check the numbers before
	// they size a buffer or index the page lists.
	if err := e.check(len(a.TextPages), len(a.DataPages)); err != nil {
		return fmt.Errorf("codearea: releasing %s: %w", name, err)
	}
	textVA := a.TextVA(e.TextPage)
	if at := e.Site; at != 0 {
		var site [5]byte
		t, err := a.k.AS.Translate(at)
		if err != nil {
			return fmt.Errorf("codearea: entry site of %s: %w", name, err)
		}
		if err := sg.Read(at, t.GPA, site[:]); err != nil {
			return fmt.Errorf("codearea: entry site of %s: %w", name, err)
		}
		if to, ok := JumpTarget(at, site[:]); ok && to >= textVA && to < textVA+e.TextSize {
			return fmt.Errorf("codearea: %s: the jump at %#x still leads to %#x in the area: remove it first", name, at, to)
		}
	}
	dataVA := a.DataVA(e.DataPage)
	if err := a.inUse(sg, name, textVA, textVA+uint64(e.TextPages)*pageSize, dataVA, dataVA+uint64(e.DataPages)*pageSize); err != nil {
		return err
	}
	// The text must be what was installed: anything else means someone
	// else wrote here, and zeroing it would hide that.
	text := make([]byte, e.TextSize)
	if err := sg.Read(textVA, a.TextPages[e.TextPage], text[:min(len(text), pageSize)]); err != nil {
		return fmt.Errorf("codearea: reading %s: %w", name, err)
	}
	for off := pageSize; off < len(text); off += pageSize {
		i := e.TextPage + off/pageSize
		if err := sg.Read(a.TextVA(i), a.TextPages[i], text[off:min(off+pageSize, len(text))]); err != nil {
			return fmt.Errorf("codearea: reading %s: %w", name, err)
		}
	}
	if crc := crc32.ChecksumIEEE(text); crc != e.TextCRC {
		return fmt.Errorf("codearea: the text of %s in the guest has CRC %#x, installed %#x: changed behind our back, not releasing", name, crc, e.TextCRC)
	}

	zero := make([]byte, pageSize)
	curHdr, err := a.headerPage(a.entries)
	if err != nil {
		return err
	}
	var ws []PageWrite
	last := len(rest) == 0
	if last {
		pmdOld := putU64(entry(a.PageTable, pmdTable))
		ws = append(ws,
			PageWrite{"PMD entry", a.directVA(a.PMDEntryGPA), a.PMDEntryGPA, pmdOld, make([]byte, 8)},
			PageWrite{"page table", a.directVA(a.PageTable), a.PageTable, a.pageTable(), zero})
	}
	pageOld := func(gpa uint64) ([]byte, error) {
		b := make([]byte, pageSize)
		return b, sg.Read(a.directVA(gpa), gpa, b)
	}
	for i := e.TextPage; i < e.TextPage+e.TextPages; i++ {
		old, err := pageOld(a.TextPages[i])
		if err != nil {
			return err
		}
		ws = append(ws, PageWrite{fmt.Sprintf("text page %d", i), a.directVA(a.TextPages[i]), a.TextPages[i], old, zero})
	}
	for i := e.DataPage; i < e.DataPage+e.DataPages; i++ {
		old, err := pageOld(a.DataPages[i])
		if err != nil {
			return err
		}
		ws = append(ws, PageWrite{fmt.Sprintf("data page %d", i), a.directVA(a.DataPages[i]), a.DataPages[i], old, zero})
	}
	newHdr := zero
	if !last {
		if newHdr, err = a.headerPage(rest); err != nil {
			return err
		}
	}
	ws = append(ws, PageWrite{"allocation header", a.directVA(a.Header), a.Header, curHdr, newHdr})
	if err := apply(sg, ws); err != nil {
		return fmt.Errorf("codearea: releasing %s: %w", name, err)
	}
	a.entries = rest
	if last {
		a.mapped = false
		as := introspect.NewAddressSpace(a.k.Mem, a.k.CR3, a.k.LA57)
		if _, err := as.Translate(textVA); err == nil {
			return fmt.Errorf("codearea: released the area but %#x still translates", textVA)
		}
	}
	return nil
}
