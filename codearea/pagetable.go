package codearea

import (
	"encoding/binary"
	"fmt"

	"github.com/hvpatch/hvpatch/hypervisor"
)

const pageSize = 4096

// x86-64 page-table entry bits (Intel SDM vol. 3, 4.5).
const (
	ptePresent  = 1 << 0
	pteWritable = 1 << 1
	pteUser     = 1 << 2
	pteAccessed = 1 << 5
	pteDirty    = 1 << 6
	ptePS       = 1 << 7
	pteGlobal   = 1 << 8
	pteNX       = 1 << 63
	pteAddrMask = 0x000ffffffffff000
)

// Entries are written with accessed and dirty already set, as the kernel
// does for its own mappings, so the CPU never writes to our tables. No
// entry is global: a CR3 switch without PCID drops what a vCPU cached.
const (
	// pmdTable points a PMD slot at a page table (the kernel's
	// _KERNPG_TABLE): rights are decided by the PTEs.
	pmdTable = ptePresent | pteWritable | pteAccessed | pteDirty
	// pteText: read-only, executable, supervisor.
	pteText = ptePresent | pteAccessed | pteDirty
	// pteData: read-write, never executable, supervisor.
	pteData = ptePresent | pteWritable | pteAccessed | pteDirty | pteNX
)

// entry builds a page-table entry for the page (or table) at gpa.
func entry(gpa, flags uint64) uint64 { return gpa&pteAddrMask | flags }

// kernelImageStart..kernelImageEnd is the 1 GiB level2_kernel_pgt covers.
const (
	kernelImageStart = 0xffffffff80000000
	kernelImageEnd   = 0xffffffffc0000000
	pmdSpan          = 1 << 21
)

// pmdTableOf walks root down to the PMD table covering va (4 or 5 levels)
// and returns its guest-physical address. It refuses large pages above the
// PMD level: the kernel-image region is never mapped with 1 GiB pages.
func pmdTableOf(mem hypervisor.PhysMem, root uint64, la57 bool, va uint64) (uint64, error) {
	levels := 4
	if la57 {
		levels = 5
	}
	table := root & pteAddrMask
	for level := levels; level > 2; level-- {
		shift := uint(12 + 9*(level-1))
		idx := (va >> shift) & 511
		e, err := readU64(mem, table+idx*8)
		if err != nil {
			return 0, fmt.Errorf("level-%d entry for %#x: %w", level, va, err)
		}
		if e&ptePresent == 0 {
			return 0, fmt.Errorf("level-%d entry for %#x is not present (%#x)", level, va, e)
		}
		if e&ptePS != 0 {
			return 0, fmt.Errorf("level-%d entry for %#x maps a large page (%#x): not the kernel's layout", level, va, e)
		}
		table = e & pteAddrMask
	}
	return table, nil
}

func readU64(mem hypervisor.PhysMem, gpa uint64) (uint64, error) {
	var b [8]byte
	if err := mem.ReadPhys(gpa, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

func putU64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}

// tableRefs records which guest-physical pages the page tables under one
// root use, as page tables or as mapped pages (outside the direct map).
// Only leaves that reach into the first MiB are kept (the only pages
// references is asked about), once each: a guest's tables may map the same
// page any number of times, and one table page listing itself in every
// entry would otherwise collect leaves until memory runs out.
type tableRefs struct {
	tables    map[uint64]bool // page-table pages
	leaves    []leafRef       // leaf mappings outside the direct map that reach into the first MiB
	leafSeen  map[leafKey]bool
	leafCount int // leaf mappings outside the direct map seen, all of them
	walked    int // page-table pages read
}

type leafKey struct{ gpa, size uint64 }

type leafRef struct {
	va, gpa, size uint64
}

// maxTables bounds a walk over guest-controlled tables.
const maxTables = 1 << 18

// scanKernelTables walks the kernel half of the page tables at root and
// records every table page and every leaf mapping, except the direct map
// (a leaf whose va-gpa equals directMap), which maps all of RAM by design.
// lowerHalf also walks the user half (a process's own tables).
func scanKernelTables(mem hypervisor.PhysMem, root uint64, la57 bool, directMap uint64, refs *tableRefs, userHalf bool) error {
	levels := 4
	vaBits := uint(48)
	if la57 {
		levels, vaBits = 5, 57
	}
	var visit func(table uint64, level int, base uint64) error
	visit = func(table uint64, level int, base uint64) error {
		if refs.walked++; refs.walked > maxTables {
			return fmt.Errorf("more than %d page-table pages: giving up", maxTables)
		}
		refs.tables[table] = true
		var raw [pageSize]byte
		if err := mem.ReadPhys(table, raw[:]); err != nil {
			return fmt.Errorf("page table at %#x: %w", table, err)
		}
		shift := uint(12 + 9*(level-1))
		first, last := 0, 511
		if level == levels {
			if userHalf {
				last = 255
			} else {
				first = 256
			}
		}
		for i := first; i <= last; i++ {
			e := binary.LittleEndian.Uint64(raw[i*8:])
			if e&ptePresent == 0 {
				continue
			}
			va := base + uint64(i)<<shift
			va = uint64(int64(va<<(64-vaBits)) >> (64 - vaBits)) // canonical
			if level == 1 || (e&ptePS != 0 && level <= 3) {
				size := uint64(1) << shift
				gpa := e & pteAddrMask &^ (size - 1)
				if va-gpa != directMap {
					refs.addLeaf(leafRef{va, gpa, size})
				}
				continue
			}
			if e&ptePS != 0 {
				continue
			}
			if err := visit(e&pteAddrMask, level-1, va); err != nil {
				return err
			}
		}
		return nil
	}
	return visit(root&pteAddrMask, levels, 0)
}

// addLeaf records a leaf mapping; only the first of each physical range
// reaching into the first MiB is kept (at most 256 4 KiB pages and a few
// large ones).
func (r *tableRefs) addLeaf(l leafRef) {
	r.leafCount++
	if l.gpa >= lowMemEnd {
		return
	}
	k := leafKey{l.gpa, l.size}
	if r.leafSeen[k] {
		return
	}
	if r.leafSeen == nil {
		r.leafSeen = map[leafKey]bool{}
	}
	r.leafSeen[k] = true
	r.leaves = append(r.leaves, l)
}

// references reports why the page at gpa is in use by page tables, or "".
func (r *tableRefs) references(gpa uint64) string {
	if r.tables[gpa] {
		return "is a page-table page"
	}
	for _, l := range r.leaves {
		if gpa >= l.gpa && gpa < l.gpa+l.size {
			return fmt.Sprintf("is mapped at %#x", l.va+(gpa-l.gpa))
		}
	}
	return ""
}
