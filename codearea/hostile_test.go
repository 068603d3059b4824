package codearea

import (
	"context"
	"math"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/introspect"
)

// writeForgedArea lays out, in the fixture's guest memory, an area as
// Install leaves it (PMD entry, page table, header) but with the entries
// a guest chose: it can write any header, with a valid checksum.
func writeForgedArea(t *testing.T, entries []Entry) (*ramMem, func() (*Area, error)) {
	t.Helper()
	k, m := newFixture()
	a, err := Find(k)
	if err != nil {
		t.Fatal(err)
	}
	copy(m.b[a.PageTable:], a.pageTable())
	m.put64(a.PMDEntryGPA, entry(a.PageTable, pmdTable))
	page, err := a.headerPage(entries)
	if err != nil {
		t.Fatal(err)
	}
	copy(m.b[a.Header:], page)
	return m, func() (*Area, error) { return Find(k) }
}

// A forged header (huge text_size, page counts that overflow, a data page
// index past the list) made recover accept it, then Release allocate
// text_size bytes or index past the page lists.
func TestForgedHeaderRefused(t *testing.T) {
	good := Entry{Name: "e", TextPage: 0, TextPages: 1, DataPage: 0, DataPages: 1, TextSize: 100, DataSize: 10, Entry: 0}
	for _, c := range []struct {
		name  string
		forge func(e *Entry)
	}{
		{"huge text_size", func(e *Entry) { e.TextSize = 1 << 62 }},
		{"text_size over its pages", func(e *Entry) { e.TextSize = 5 * pageSize }},
		{"text pages overflow", func(e *Entry) { e.TextPage, e.TextPages = 1, math.MaxInt64 }},
		{"data pages overflow", func(e *Entry) { e.DataPage, e.DataPages = 1, math.MaxInt64 }},
		{"negative data pages", func(e *Entry) { e.DataPage, e.DataPages = 3, -2 }},
		{"data page past the list", func(e *Entry) { e.DataPage, e.DataPages, e.DataSize = 64, 0, 0 }},
		{"data_size over its pages", func(e *Entry) { e.DataSize = 1 << 40 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := good
			c.forge(&e)
			m, find := writeForgedArea(t, []Entry{e})
			a, err := find()
			if err == nil {
				// Not refused at recovery: release must still fail cleanly
				// (no thread is in the code).
				a.threadsFn = func(*introspect.AddressSpace) ([]thread, error) { return nil, nil }
				w := &memWriter{mem: m}
				sg, _ := w.Stop(context.Background())
				err = a.ReleaseStopped(sg, "e")
			}
			if err == nil || !strings.Contains(err.Error(), "entry \"e\"") {
				t.Errorf("forged entry %+v: %v", e, err)
			}
		})
	}
	// The unforged entry recovers.
	_, find := writeForgedArea(t, []Entry{good})
	if a, err := find(); err != nil || !a.Recovered {
		t.Errorf("real header: %v", err)
	}
}

// A page-table page that lists itself made the code-area scan collect a
// leaf per entry of every level it was reached at, without bound.
func TestScanSelfReferencingTable(t *testing.T) {
	for _, n := range []uint64{8, 512} {
		k, m := newFixture()
		const self = 0x600000 // above the first MiB, as any table may be
		for i := uint64(0); i < n; i++ {
			m.put64(self+i*8, self|ptePresent|pteWritable)
		}
		// The kernel half of the PGD: n entries to it.
		for i := uint64(0); i < n; i++ {
			m.put64(fxPGD+(300+i)*8, self|ptePresent|pteWritable)
		}
		refs := &tableRefs{tables: map[uint64]bool{}}
		err := scanKernelTables(k.Mem, k.CR3, k.LA57, k.DirectMapBase, refs, false)
		if n == 512 && (err == nil || !strings.Contains(err.Error(), "giving up")) {
			t.Errorf("%d entries: scan error %v", n, err)
		}
		if n == 8 && err != nil {
			t.Errorf("%d entries: %v", n, err)
		}
		// Leaves kept: only those reaching into the first MiB, once each.
		if len(refs.leaves) > 8 {
			t.Errorf("%d entries: %d leaves kept (%d seen)", n, len(refs.leaves), refs.leafCount)
		}
		if n == 8 && refs.leafCount < 8*8*8*8 {
			t.Errorf("%d entries: %d leaves seen", n, refs.leafCount)
		}
	}
}
