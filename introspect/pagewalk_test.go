package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
)

// sliceMem is guest RAM held in a byte slice starting at guest-physical 0.
type sliceMem struct{ b []byte }

func (m *sliceMem) check(op string, gpa uint64, n int) error {
	if gpa > uint64(len(m.b)) || uint64(n) > uint64(len(m.b))-gpa {
		return &hypervisor.AccessError{Op: op, GPA: gpa, Len: n, What: "not RAM"}
	}
	return nil
}
func (m *sliceMem) ReadPhys(gpa uint64, p []byte) error {
	if err := m.check("read", gpa, len(p)); err != nil {
		return err
	}
	copy(p, m.b[gpa:])
	return nil
}
func (m *sliceMem) WritePhys(gpa uint64, p []byte) error {
	if err := m.check("write", gpa, len(p)); err != nil {
		return err
	}
	copy(m.b[gpa:], p)
	return nil
}
func (m *sliceMem) Regions() []hypervisor.Region {
	return []hypervisor.Region{{GPA: 0, Size: uint64(len(m.b)), Name: "test"}}
}
func (m *sliceMem) Close() error { return nil }

// pageTables builds x86-64 page tables in a sliceMem. Table pages are handed
// out from the top of a reserved area so they never overlap mapped data.
type pageTables struct {
	mem  *sliceMem
	root uint64
	la57 bool
	next uint64 // next free table page
}

func newPageTables(memSize, tableArea uint64, la57 bool) *pageTables {
	pt := &pageTables{mem: &sliceMem{b: make([]byte, memSize)}, la57: la57, next: tableArea}
	pt.root = pt.alloc()
	return pt
}

func (pt *pageTables) alloc() uint64 {
	p := pt.next
	pt.next += Size4K
	return p
}

func (pt *pageTables) entry(addr uint64) uint64 { return binary.LittleEndian.Uint64(pt.mem.b[addr:]) }
func (pt *pageTables) set(addr, v uint64)       { binary.LittleEndian.PutUint64(pt.mem.b[addr:], v) }

// mapPage maps one page of the given size. Intermediate entries get
// interFlags; the leaf gets leafFlags (plus PS for large pages).
func (pt *pageTables) mapPage(va, gpa, size, interFlags, leafFlags uint64) {
	levels := 4
	if pt.la57 {
		levels = 5
	}
	leafLevel := map[uint64]int{Size4K: 1, Size2M: 2, Size1G: 3}[size]
	table := pt.root
	for level := levels; level > leafLevel; level-- {
		slot := table + (va>>(12+9*(level-1))&511)*8
		e := pt.entry(slot)
		if e&ptePresent == 0 {
			e = pt.alloc() | interFlags
			pt.set(slot, e)
		}
		table = e & pteAddrMask
	}
	slot := table + (va>>(12+9*(leafLevel-1))&511)*8
	leaf := gpa | leafFlags
	if leafLevel > 1 {
		leaf |= ptePS
	}
	pt.set(slot, leaf)
}

const rw = ptePresent | pteWritable

func TestTranslateSizesAndRights(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	pt.mapPage(0xffffffff81000000, 0x5000, Size4K, rw, ptePresent|pteNX)
	pt.mapPage(0xffff888000200000, 0x200000, Size2M, rw|pteNX, rw)
	// A 1 GiB page whose frame lies outside RAM: translation is pure
	// arithmetic on the entry and must still work (MMIO mappings do this).
	pt.mapPage(0x00007f0040000000, 0x40000000, Size1G, rw|pteUser, rw|pteUser)
	as := NewAddressSpace(pt.mem, pt.root|0x5, false) // PCID bits ignored

	cases := []struct {
		va   uint64
		want Translation
	}{
		{0xffffffff81000123, Translation{GPA: 0x5123, PageSize: Size4K, Writable: false, NX: true}},
		{0xffff888000212345, Translation{GPA: 0x212345, PageSize: Size2M, Writable: true, NX: true}},
		{0x00007f0041234567, Translation{GPA: 0x41234567, PageSize: Size1G, Writable: true, User: true}},
	}
	for _, c := range cases {
		for round := 0; round < 2; round++ { // second round answers from the cache
			got, err := as.Translate(c.va)
			if err != nil {
				t.Fatalf("Translate(%#x): %v", c.va, err)
			}
			if got != c.want {
				t.Errorf("Translate(%#x) round %d = %+v, want %+v", c.va, round, got, c.want)
			}
		}
	}
}

func TestTranslateLargePagePATBitIsNotAddress(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	// Bit 12 of a 2 MiB PDE is PAT: it must not leak into the address.
	pt.mapPage(0xffffffff80200000, 0x200000|1<<12, Size2M, rw, rw)
	got, err := NewAddressSpace(pt.mem, pt.root, false).Translate(0xffffffff80200010)
	if err != nil || got.GPA != 0x200010 {
		t.Fatalf("got %+v, %v; want GPA 0x200010", got, err)
	}
}

func TestTranslateFiveLevel(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, true)
	va := uint64(0xff11000000001000) // bits 48-56 in use: only reachable with LA57
	pt.mapPage(va, 0x7000, Size4K, rw, rw)
	as := NewAddressSpace(pt.mem, pt.root, true)
	got, err := as.Translate(va + 0x10)
	if err != nil || got.GPA != 0x7010 {
		t.Fatalf("5-level Translate = %+v, %v; want GPA 0x7010", got, err)
	}
	// The same table read as 4-level must not find it: the address is not
	// even canonical with 48 bits.
	if _, err := NewAddressSpace(pt.mem, pt.root, false).Translate(va); err == nil {
		t.Fatal("4-level walk of a 57-bit address succeeded")
	}
	ms, err := as.Mappings(0xff00000000000000, 0xffffffffffffffff)
	if err != nil || len(ms) != 1 || ms[0].VA != va || ms[0].GPA != 0x7000 {
		t.Fatalf("Mappings = %+v, %v", ms, err)
	}
}

func TestTranslateErrors(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	pt.mapPage(0xffffffff81000000, 0x5000, Size4K, rw, rw)
	// A PDE pointing outside guest RAM (guest-controlled garbage).
	pdpt := pt.entry(pt.root+511*8) & pteAddrMask
	pd := pt.entry(pdpt+510*8) & pteAddrMask
	pt.set(pd+9*8, 0x7fff_0000_0000|rw)
	// The large-page bit in a PML4 entry is reserved.
	pt.set(pt.root+300*8, 0x1000|rw|ptePS)
	as := NewAddressSpace(pt.mem, pt.root, false)

	for _, c := range []struct {
		va   uint64
		want string
	}{
		{0xffffffff81001000, "not mapped"},
		{0x0000900000000000, "not canonical"},
		{0xffffffff81200000, "unreadable"},
		{0xffff960000000000, "reserves"},
	} {
		_, err := as.Translate(c.va)
		var te *TranslationError
		if !errors.As(err, &te) || !strings.Contains(err.Error(), c.want) || te.VA != c.va {
			t.Errorf("Translate(%#x) error = %v, want a TranslationError containing %q", c.va, err, c.want)
		}
	}
}

func TestReadWriteAcrossPages(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	base := uint64(0xffffc90000000000)
	// Two virtually adjacent pages, physically far apart and in reverse order.
	pt.mapPage(base, 0x9000, Size4K, rw, rw)
	pt.mapPage(base+Size4K, 0x3000, Size4K, rw, rw)
	as := NewAddressSpace(pt.mem, pt.root, false)

	data := []byte("spans the page boundary")
	va := base + Size4K - 5
	if err := as.WriteVirt(va, data); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pt.mem.b[0x9ffb:0xa000], data[:5]) || !bytes.Equal(pt.mem.b[0x3000:0x3000+len(data)-5], data[5:]) {
		t.Fatal("WriteVirt put the bytes in the wrong physical places")
	}
	got := make([]byte, len(data))
	if err := as.ReadVirt(va, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadVirt = %q, %v", got, err)
	}

	// A write running into an unmapped page changes nothing.
	before := bytes.Clone(pt.mem.b)
	if err := as.WriteVirt(base+2*Size4K-2, []byte{1, 2, 3, 4}); err == nil {
		t.Fatal("write into an unmapped page succeeded")
	}
	if !bytes.Equal(before, pt.mem.b) {
		t.Fatal("a failed WriteVirt changed memory")
	}
}

func TestCacheAndFlush(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	va := uint64(0x400000)
	pt.mapPage(va, 0x8000, Size4K, rw|pteUser, rw|pteUser)
	as := NewAddressSpace(pt.mem, pt.root, false)
	if tr, _ := as.Translate(va); tr.GPA != 0x8000 {
		t.Fatalf("GPA %#x", tr.GPA)
	}
	pt.mapPage(va, 0xa000, Size4K, rw|pteUser, rw|pteUser) // guest remaps
	if tr, _ := as.Translate(va); tr.GPA != 0x8000 {
		t.Fatalf("cached translation not used: %#x", tr.GPA)
	}
	as.Flush()
	if tr, _ := as.Translate(va); tr.GPA != 0xa000 {
		t.Fatalf("after Flush: %#x, want 0xa000", tr.GPA)
	}
}

func TestMappingsMerges(t *testing.T) {
	pt := newPageTables(8<<20, 7<<20, false)
	start := uint64(0xffffffffbb800000)
	// Like the kernel image: 4 KiB pages at the edges, 2 MiB in the middle.
	for i := uint64(0); i < 4; i++ {
		pt.mapPage(start+i*Size4K, 0x1000000+i*Size4K, Size4K, rw, ptePresent)
	}
	pt.mapPage(start+Size2M, 0x1200000, Size2M, rw, ptePresent)
	pt.mapPage(start+2*Size2M, 0x1400000, Size2M, rw, ptePresent)
	pt.mapPage(start+3*Size2M, 0x1600000, Size4K, rw, rw|pteNX)
	as := NewAddressSpace(pt.mem, pt.root, false)
	ms, err := as.Mappings(0xffffffff80000000, 0xffffffffc0000000)
	if err != nil {
		t.Fatal(err)
	}
	want := []Mapping{
		{VA: start, Translation: Translation{GPA: 0x1000000, PageSize: Size4K}, Size: 4 * Size4K},
		{VA: start + Size2M, Translation: Translation{GPA: 0x1200000, PageSize: Size2M}, Size: 2 * Size2M},
		{VA: start + 3*Size2M, Translation: Translation{GPA: 0x1600000, PageSize: Size4K, Writable: true, NX: true}, Size: Size4K},
	}
	if len(ms) != len(want) {
		t.Fatalf("Mappings = %+v", ms)
	}
	for i := range want {
		if ms[i] != want[i] {
			t.Errorf("mapping %d = %+v, want %+v", i, ms[i], want[i])
		}
	}
}

func TestKernelCR3(t *testing.T) {
	if got := KernelCR3(0x1234_5000 | 1<<12 | 0x801); got != 0x1234_4000 {
		t.Fatalf("KernelCR3 = %#x", got)
	}
}
