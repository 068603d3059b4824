package codearea

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
)

// FuzzDecodeHeader: any page as an allocation header decodes to a header
// whose numbers are within its page lists, or fails; and any header that
// decodes is recovered or refused by Find and released or refused without
// a panic.
func FuzzDecodeHeader(f *testing.F) {
	good := Entry{Name: "hvpatch_version_proc_show", TextPage: 0, TextPages: 1, DataPage: 0, DataPages: 1, TextSize: 100, DataSize: 10}
	for _, es := range [][]Entry{nil, {good}, {good, {Name: "b", TextPage: 1, TextPages: 2, DataPage: 1, TextSize: 5000}}} {
		h := &header{Version: headerVersion, KernelText: fxText, Base: 0xffffffff81400000, PMDEntry: fxPMDKernel + 10*8,
			PageTable: 0x11000, Text: []uint64{0x12000, 0x13000, 0x14000}, Data: []uint64{0x16000, 0x17000}, Entries: es}
		page, err := h.encode()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(page)
	}
	f.Fuzz(func(t *testing.T, page []byte) {
		h, err := decodeHeader(page)
		if err != nil {
			return
		}
		for _, e := range h.Entries {
			if e.TextPage < 0 || e.TextPages < 1 || e.TextPage+e.TextPages > len(h.Text) ||
				e.DataPage < 0 || e.DataPages < 0 || e.DataPage+e.DataPages > len(h.Data) || e.TextSize > uint64(e.TextPages)*pageSize {
				t.Fatalf("entry %+v accepted with %d text and %d data pages", e, len(h.Text), len(h.Data))
			}
		}
		// Through Find and Release, in the fixture's guest.
		k, m := newFixture()
		a, err := Find(k)
		if err != nil {
			t.Fatal(err)
		}
		copy(m.b[a.PageTable:], a.pageTable())
		m.put64(a.PMDEntryGPA, entry(a.PageTable, pmdTable))
		h.KernelText, h.Base, h.PMDEntry, h.PageTable = k.TextStart, a.Base, a.PMDEntryGPA, a.PageTable
		hp, err := h.encode()
		if err != nil {
			return
		}
		copy(m.b[a.Header:], hp)
		b, err := Find(k)
		if err != nil {
			return
		}
		w := &memWriter{mem: m}
		sg, _ := w.Stop(context.Background())
		for _, e := range b.Entries() {
			_ = b.ReleaseStopped(sg, e.Name)
		}
	})
}

// FuzzScanTables: any page tables (the fuzzer's bytes as the table pages
// from 2 MiB, the root first) are scanned within the limits.
func FuzzScanTables(f *testing.F) {
	k, m := newFixture()
	f.Add(bytes.Clone(m.b[fxPGD : fxPUDVmall+pageSize]))
	self := make([]byte, pageSize)
	for i := 0; i < 512; i++ {
		binary.LittleEndian.PutUint64(self[i*8:], fxPGD|ptePresent|pteWritable)
	}
	f.Add(self)
	f.Fuzz(func(t *testing.T, tables []byte) {
		mem := &ramMem{b: make([]byte, 8<<20)}
		copy(mem.b[fxPGD:], tables[:min(len(tables), 1<<20)])
		refs := &tableRefs{tables: map[uint64]bool{}}
		_ = scanKernelTables(mem, fxPGD, false, k.DirectMapBase, refs, false)
		_ = scanKernelTables(mem, fxPGD, false, k.DirectMapBase, refs, true)
		if len(refs.leaves) > 2*maxAreaPages+64 || refs.walked > maxTables+2 {
			t.Fatalf("%d leaves kept, %d tables walked", len(refs.leaves), refs.walked)
		}
	})
}
