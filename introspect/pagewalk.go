package introspect

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/hvpatch/hvpatch/hypervisor"
)

// Page-table entry bits (Intel SDM vol. 3, 4.5).
const (
	ptePresent  = 1 << 0
	pteWritable = 1 << 1
	pteUser     = 1 << 2
	ptePS       = 1 << 7 // large page at the PDPT (1 GiB) and PD (2 MiB) levels
	pteNX       = 1 << 63

	// Bits 12..51 hold the physical address; the rest of an entry is flags,
	// protection keys and bits the OS may use.
	pteAddrMask = 0x000ffffffffff000

	// CR3 bits 0-11 are the PCID (or PWT/PCD); with PTI, bit 12 selects the
	// user copy of the PGD, which maps only the entry code of the kernel.
	cr3KernelMask = pteAddrMask &^ (1 << 12)
)

// Page sizes.
const (
	Size4K = 1 << 12
	Size2M = 1 << 21
	Size1G = 1 << 30
)

// Translation is where one virtual address lives in guest-physical memory,
// and the rights of the page holding it (combined over all levels).
type Translation struct {
	GPA      uint64
	PageSize uint64
	Writable bool
	NX       bool
	User     bool
}

// TranslationError reports a virtual address that does not translate.
type TranslationError struct {
	VA     uint64
	Level  int // paging level of the entry that stopped the walk (5..1), 0 if none
	Reason string
	Err    error // the read that failed, if one did (a *hypervisor.AccessError, a *BudgetError)
}

func (e *TranslationError) Unwrap() error { return e.Err }

func (e *TranslationError) Error() string {
	if e.Level == 0 {
		return fmt.Sprintf("virtual address %#x: %s", e.VA, e.Reason)
	}
	return fmt.Sprintf("virtual address %#x: %s (level %d)", e.VA, e.Reason, e.Level)
}

// VirtMem is guest-virtual memory; *AddressSpace implements it.
type VirtMem interface {
	ReadVirt(va uint64, p []byte) error
	WriteVirt(va uint64, p []byte) error
}

var _ VirtMem = (*AddressSpace)(nil)

// AddressSpace translates and accesses guest-virtual memory for one page
// table root. It is safe for concurrent use. Translations are cached: call
// Flush when the guest may have changed its page tables since.
type AddressSpace struct {
	mem  hypervisor.PhysMem
	root uint64 // physical address of the top-level table
	la57 bool

	mu    sync.Mutex
	cache map[uint64]Translation // key: page base VA | size class; value: page-granular translation
}

// cacheLimit bounds the translation cache; it is dropped whole when full,
// which is cheap and good enough for the access patterns here (sequential
// reads of the kernel image, list walks over slab memory).
const cacheLimit = 1 << 14

// NewAddressSpace walks the page tables rooted at cr3. PCID bits are
// ignored; callers that want the kernel half under PTI pass a CR3 with bit
// 12 clear (KernelCR3 does that).
func NewAddressSpace(mem hypervisor.PhysMem, cr3 uint64, la57 bool) *AddressSpace {
	return &AddressSpace{mem: mem, root: cr3 & pteAddrMask, la57: la57, cache: make(map[uint64]Translation)}
}

// KernelCR3 returns the kernel page-table root for a CR3 value seen on a
// vCPU: PCID bits and the PTI user-copy bit cleared.
func KernelCR3(cr3 uint64) uint64 { return cr3 & cr3KernelMask }

// Root is the physical address of the top-level page table.
func (a *AddressSpace) Root() uint64 { return a.root }

// LA57 reports 5-level paging.
func (a *AddressSpace) LA57() bool { return a.la57 }

// Levels is the number of paging levels (4 or 5).
func (a *AddressSpace) Levels() int {
	if a.la57 {
		return 5
	}
	return 4
}

// Flush drops cached translations.
func (a *AddressSpace) Flush() {
	a.mu.Lock()
	clear(a.cache)
	a.mu.Unlock()
}

// canonical reports whether va sign-extends from the top implemented bit.
func (a *AddressSpace) canonical(va uint64) bool {
	bits := uint(48)
	if a.la57 {
		bits = 57
	}
	top := int64(va) >> (bits - 1)
	return top == 0 || top == -1
}

// cacheKey puts the page size class into the low bits of the page base.
func cacheKey(va, size uint64) uint64 {
	switch size {
	case Size2M:
		return va&^(size-1) | 1
	case Size1G:
		return va&^(size-1) | 2
	}
	return va &^ (size - 1)
}

// Translate walks the page tables for va.
func (a *AddressSpace) Translate(va uint64) (Translation, error) {
	a.mu.Lock()
	for _, size := range [...]uint64{Size4K, Size2M, Size1G} {
		if t, ok := a.cache[cacheKey(va, size)]; ok && t.PageSize == size {
			a.mu.Unlock()
			t.GPA += va & (size - 1)
			return t, nil
		}
	}
	a.mu.Unlock()
	t, err := a.walk(va)
	if err != nil {
		return Translation{}, err
	}
	base := t
	base.GPA &^= t.PageSize - 1
	a.mu.Lock()
	if len(a.cache) >= cacheLimit {
		clear(a.cache)
	}
	a.cache[cacheKey(va, t.PageSize)] = base
	a.mu.Unlock()
	return t, nil
}

// walk translates without the cache.
func (a *AddressSpace) walk(va uint64) (Translation, error) {
	if !a.canonical(va) {
		return Translation{}, &TranslationError{VA: va, Reason: "not canonical"}
	}
	t := Translation{Writable: true, User: true}
	table := a.root
	var buf [8]byte
	for level := a.Levels(); level >= 1; level-- {
		shift := uint(12 + 9*(level-1))
		index := (va >> shift) & 511
		entryAddr := table + index*8
		if err := a.mem.ReadPhys(entryAddr, buf[:]); err != nil {
			return Translation{}, &TranslationError{VA: va, Level: level,
				Reason: fmt.Sprintf("page-table entry at guest-physical %#x unreadable: %v", entryAddr, err), Err: err}
		}
		e := binary.LittleEndian.Uint64(buf[:])
		if e&ptePresent == 0 {
			return Translation{}, &TranslationError{VA: va, Level: level, Reason: "not mapped"}
		}
		t.Writable = t.Writable && e&pteWritable != 0
		t.User = t.User && e&pteUser != 0
		t.NX = t.NX || e&pteNX != 0
		if level == 1 || e&ptePS != 0 {
			if level > 3 {
				return Translation{}, &TranslationError{VA: va, Level: level,
					Reason: fmt.Sprintf("large-page bit set in entry %#x where the architecture reserves it", e)}
			}
			size := uint64(1) << shift
			// For large pages bit 12 is PAT, not address: mask below the page size.
			t.GPA = e&pteAddrMask&^(size-1) | va&(size-1)
			t.PageSize = size
			return t, nil
		}
		table = e & pteAddrMask
	}
	panic("unreachable")
}

// ReadVirt reads len(p) bytes at va, crossing pages as needed. Nothing is
// guaranteed about p's contents on error.
func (a *AddressSpace) ReadVirt(va uint64, p []byte) error {
	for done := 0; done < len(p); {
		cur := va + uint64(done)
		t, err := a.Translate(cur)
		if err != nil {
			return err
		}
		n := int(min(uint64(len(p)-done), t.PageSize-(cur&(t.PageSize-1))))
		if err := a.mem.ReadPhys(t.GPA, p[done:done+n]); err != nil {
			return fmt.Errorf("reading virtual %#x (guest-physical %#x): %w", cur, t.GPA, err)
		}
		done += n
	}
	return nil
}

// WriteVirt writes p at va. Every page is translated before anything is
// written, so an unmapped page in the range leaves memory unchanged. Page
// protections are not enforced: the hypervisor writes physical memory, and
// patching read-only kernel text is the point.
func (a *AddressSpace) WriteVirt(va uint64, p []byte) error {
	type piece struct {
		gpa  uint64
		from int
		to   int
	}
	var pieces []piece
	for done := 0; done < len(p); {
		cur := va + uint64(done)
		t, err := a.Translate(cur)
		if err != nil {
			return err
		}
		n := int(min(uint64(len(p)-done), t.PageSize-(cur&(t.PageSize-1))))
		pieces = append(pieces, piece{t.GPA, done, done + n})
		done += n
	}
	for _, pc := range pieces {
		if err := a.mem.WritePhys(pc.gpa, p[pc.from:pc.to]); err != nil {
			return fmt.Errorf("writing virtual %#x (guest-physical %#x): %w", va+uint64(pc.from), pc.gpa, err)
		}
	}
	return nil
}

// ReadUint64 reads one little-endian 64-bit value at va.
func (a *AddressSpace) ReadUint64(va uint64) (uint64, error) {
	var b [8]byte
	if err := a.ReadVirt(va, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// Mapping is one run of virtually and physically contiguous memory with
// the same page size and rights.
type Mapping struct {
	VA uint64
	Translation
	Size uint64
}

// Limits on Mappings, whatever the guest's tables say: a table may list
// itself, or one table page many times, so a walk is bounded by the pages
// it reads and the mappings it returns, not by the tables' shape. The
// kernel-image region (1 GiB) takes at most 515 tables and 262,144 4 KiB
// leaves.
const (
	maxMappingTables = 1 << 16
	maxMappings      = 1 << 20
)

// Mappings lists what is mapped in [start, end), merging adjacent pages of
// the same size and rights that are also physically contiguous. It reads
// each page table once, so scanning a 1 GiB region costs a few reads.
func (a *AddressSpace) Mappings(start, end uint64) ([]Mapping, error) {
	var out []Mapping
	tables := 0
	add := func(va uint64, t Translation) {
		if n := len(out); n > 0 {
			last := &out[n-1]
			if last.VA+last.Size == va && last.GPA+last.Size == t.GPA && last.PageSize == t.PageSize &&
				last.Writable == t.Writable && last.NX == t.NX && last.User == t.User {
				last.Size += t.PageSize
				return
			}
		}
		out = append(out, Mapping{VA: va, Translation: t, Size: t.PageSize})
	}
	var visit func(table uint64, level int, base uint64, acc Translation) error
	visit = func(table uint64, level int, base uint64, acc Translation) error {
		if tables++; tables > maxMappingTables {
			return &TranslationError{VA: base, Level: level,
				Reason: fmt.Sprintf("more than %d page tables under %#x-%#x: giving up", maxMappingTables, start, end)}
		}
		if len(out) >= maxMappings {
			return &TranslationError{VA: base, Level: level,
				Reason: fmt.Sprintf("more than %d separate mappings in %#x-%#x: giving up", maxMappings, start, end)}
		}
		shift := uint(12 + 9*(level-1))
		span := uint64(1) << shift
		var raw [4096]byte
		if err := a.mem.ReadPhys(table, raw[:]); err != nil {
			return &TranslationError{VA: base, Level: level,
				Reason: fmt.Sprintf("page table at guest-physical %#x unreadable: %v", table, err), Err: err}
		}
		for i := uint64(0); i < 512; i++ {
			va := a.signExtend(base + i*span)
			if va+span-1 < start || va >= end {
				continue
			}
			e := binary.LittleEndian.Uint64(raw[i*8:])
			if e&ptePresent == 0 {
				continue
			}
			t := Translation{
				Writable: acc.Writable && e&pteWritable != 0,
				User:     acc.User && e&pteUser != 0,
				NX:       acc.NX || e&pteNX != 0,
			}
			if level == 1 || (e&ptePS != 0 && level <= 3) {
				t.PageSize = span
				t.GPA = e & pteAddrMask &^ (span - 1)
				add(va, t)
				continue
			}
			if e&ptePS != 0 {
				continue // reserved bit set: the CPU would fault; so do we, by skipping
			}
			if err := visit(e&pteAddrMask, level-1, va, t); err != nil {
				return err
			}
		}
		return nil
	}
	err := visit(a.root, a.Levels(), 0, Translation{Writable: true, User: true})
	return out, err
}

// signExtend makes an address built from table indices canonical.
func (a *AddressSpace) signExtend(va uint64) uint64 {
	bits := uint(48)
	if a.la57 {
		bits = 57
	}
	return uint64(int64(va<<(64-bits)) >> (64 - bits))
}
