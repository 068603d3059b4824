package codearea

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/introspect"
)

// The first MiB of guest RAM: what Linux (5.13+) reserves whole.
const (
	lowMemEnd = 1 << 20
	// Below 64 KiB some BIOSes scribble on suspend and resume (the reason
	// for CONFIG_X86_RESERVE_LOW); never use it, zero or not.
	lowGuard = 0x10000
	// The EBDA and ROM area is at 0x9f000 at the latest (the kernel's
	// BIOS_START_MAX); lower if the BDA says so.
	biosStartMax = 0x9f000
	biosStartMin = 0x20000
)

// LowMemReport is the evidence behind each free page: what was checked and
// what was rejected, page by page.
type LowMemReport struct {
	Free       []uint64          // guest-physical addresses of the verified free pages
	Rejected   map[uint64]string // page -> why it is not free
	Limit      uint64            // first byte of the EBDA/ROM area used as the upper bound
	EBDA       uint64            // from the BDA word at 0x40e (0 if unset)
	BaseMemTop uint64            // from the BDA word at 0x413 (KiB of base memory)
	Trampoline [2]uint64         // [start, end) of the real-mode trampoline
	Checks     []string          // what was verified, in words, for reports and the header
}

// lowScan is the verification state of the first MiB's pages.
type lowScan struct {
	k   *introspect.Kernel
	mem []byte // the first MiB
	rep *LowMemReport
}

func (s *lowScan) reject(gpa uint64, why string) {
	if _, done := s.rep.Rejected[gpa]; !done {
		s.rep.Rejected[gpa] = why
	}
}

// ScanLowMemory finds the pages of the first MiB that are free for the
// hypervisor, by evidence: below the EBDA/ROM area and the BDA's base
// memory size, above the low 64 KiB, outside the real-mode trampoline
// (kallsyms real_mode_header and the blob's size), zero-filled, reserved
// in the kernel's own struct page (PG_reserved: the page allocator never
// owns it), and neither a page-table page nor mapped anywhere but the
// direct map in the kernel's page tables or any process's.
func ScanLowMemory(k *introspect.Kernel) (*LowMemReport, error) {
	s := &lowScan{k: k, rep: &LowMemReport{Rejected: map[uint64]string{}}}
	s.mem = make([]byte, lowMemEnd)
	if err := k.Mem.ReadPhys(0, s.mem); err != nil {
		return nil, fmt.Errorf("codearea: the first MiB of guest RAM is not readable as RAM: %w", err)
	}
	rep := s.rep
	s.reject(0, "page 0 (real-mode IVT and BIOS data area)")
	for p := uint64(pageSize); p < lowGuard; p += pageSize {
		s.reject(p, "below 64 KiB (BIOS scribble zone, CONFIG_X86_RESERVE_LOW)")
	}
	if err := s.bios(); err != nil {
		return nil, err
	}
	if err := s.trampoline(); err != nil {
		return nil, err
	}
	for p := uint64(0); p < lowMemEnd; p += pageSize {
		if !allZero(s.mem[p : p+pageSize]) {
			s.reject(p, "not zero-filled")
		}
	}
	rep.Checks = append(rep.Checks, "zero-filled")
	if err := s.structPages(); err != nil {
		return nil, err
	}
	if err := s.pageTables(); err != nil {
		return nil, err
	}
	for p := uint64(0); p < lowMemEnd; p += pageSize {
		if _, bad := rep.Rejected[p]; !bad {
			rep.Free = append(rep.Free, p)
		}
	}
	return rep, nil
}

// bios bounds the usable range by the BIOS data area's own numbers.
func (s *lowScan) bios() error {
	rep := s.rep
	rep.EBDA = uint64(binary.LittleEndian.Uint16(s.mem[0x40e:])) << 4
	rep.BaseMemTop = uint64(binary.LittleEndian.Uint16(s.mem[0x413:])) << 10
	limit := uint64(biosStartMax)
	for _, v := range []uint64{rep.EBDA, rep.BaseMemTop} {
		// Out-of-range values are the firmware's problem; the kernel ignores
		// them too (reserve_bios_regions) and so does the fixed maximum.
		if v >= biosStartMin && v < limit {
			limit = v
		}
	}
	limit &^= pageSize - 1
	rep.Limit = limit
	for p := limit; p < lowMemEnd; p += pageSize {
		s.reject(p, fmt.Sprintf("EBDA/ROM area (from %#x)", limit))
	}
	rep.Checks = append(rep.Checks, fmt.Sprintf("below EBDA/ROM at %#x (BDA: EBDA %#x, base memory %#x)", limit, rep.EBDA, rep.BaseMemTop))
	return nil
}

// trampoline excludes the real-mode trampoline the kernel copied into low
// memory at boot (CPU bring-up, resume).
func (s *lowScan) trampoline() error {
	k := s.k
	hdr, err := k.Symbols.Addr("real_mode_header")
	if err != nil {
		return fmt.Errorf("codearea: cannot locate the real-mode trampoline: %w", err)
	}
	blob, err1 := k.Symbols.Addr("real_mode_blob")
	blobEnd, err2 := k.Symbols.Addr("real_mode_blob_end")
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("codearea: cannot size the real-mode trampoline: %w", err)
	}
	ptr, err := k.AS.ReadUint64(hdr)
	if err != nil {
		return fmt.Errorf("codearea: reading real_mode_header: %w", err)
	}
	pa, err := k.DirectMapToPhys(ptr)
	if err != nil {
		return fmt.Errorf("codearea: real_mode_header %#x: %w", ptr, err)
	}
	if blobEnd <= blob || blobEnd-blob > lowMemEnd {
		return fmt.Errorf("codearea: real_mode_blob..real_mode_blob_end %#x..%#x is not a plausible size", blob, blobEnd)
	}
	end := (pa + blobEnd - blob + pageSize - 1) &^ (pageSize - 1)
	s.rep.Trampoline = [2]uint64{pa &^ (pageSize - 1), end}
	for p := pa &^ (pageSize - 1); p < end; p += pageSize {
		s.reject(p, fmt.Sprintf("real-mode trampoline %#x-%#x", pa, end))
	}
	s.rep.Checks = append(s.rep.Checks, fmt.Sprintf("outside the real-mode trampoline %#x-%#x", pa, end))
	return nil
}

// structPages checks the kernel's own view: a page of the first MiB that
// the kernel reserved has PG_reserved in its struct page and is never on
// the allocator's free lists.
func (s *lowScan) structPages() error {
	k := s.k
	if k.BTF == nil {
		s.rep.Checks = append(s.rep.Checks, "struct page: NOT checked (no BTF)")
		return nil
	}
	reserved, err := enumValue(k.BTF, "pageflags", "PG_reserved")
	if err != nil {
		return fmt.Errorf("codearea: %w", err)
	}
	size, err := introspect.SizeOf(k.BTF, "page")
	if err != nil {
		return fmt.Errorf("codearea: sizeof(struct page): %w", err)
	}
	vmemmapSym, err := k.Symbols.Addr("vmemmap_base")
	if err != nil {
		return fmt.Errorf("codearea: locating the struct page array: %w", err)
	}
	vmemmap, err := k.AS.ReadUint64(vmemmapSym)
	if err != nil {
		return fmt.Errorf("codearea: reading vmemmap_base: %w", err)
	}
	for p := uint64(0); p < lowMemEnd; p += pageSize {
		if _, bad := s.rep.Rejected[p]; bad {
			continue
		}
		flags, err := k.AS.ReadUint64(vmemmap + (p/pageSize)*size)
		if err != nil {
			return fmt.Errorf("codearea: struct page of pfn %#x: %w", p/pageSize, err)
		}
		if flags&(1<<reserved) == 0 {
			s.reject(p, fmt.Sprintf("struct page flags %#x lack PG_reserved: the page allocator may own it", flags))
		}
	}
	s.rep.Checks = append(s.rep.Checks, fmt.Sprintf("PG_reserved in struct page (vmemmap %#x, bit %d)", vmemmap, reserved))
	return nil
}

func enumValue(spec *btf.Spec, enum, name string) (uint64, error) {
	types, err := spec.AnyTypesByName(enum)
	if err != nil {
		return 0, fmt.Errorf("no enum %s in BTF: %w", enum, err)
	}
	for _, t := range types {
		if e, ok := t.(*btf.Enum); ok {
			for _, v := range e.Values {
				if v.Name == name {
					return v.Value, nil
				}
			}
		}
	}
	return 0, fmt.Errorf("BTF enum %s has no %s", enum, name)
}

// pageTables rejects pages that any page table uses: as a table, or mapped
// somewhere other than the direct map. The kernel half is shared by all
// processes; each process's user half is walked too (a /dev/mem mapping of
// low memory would show up there).
func (s *lowScan) pageTables() error {
	k := s.k
	refs := &tableRefs{tables: map[uint64]bool{}}
	if err := scanKernelTables(k.Mem, k.CR3, k.LA57, k.DirectMapBase, refs, false); err != nil {
		return fmt.Errorf("codearea: walking the kernel page tables: %w", err)
	}
	what := fmt.Sprintf("not referenced by the kernel page tables (%d tables, %d non-direct-map leaves)", len(refs.tables), refs.leafCount)
	procs := 0
	if tasks, err := k.Tasks(); err != nil {
		what += "; process page tables NOT checked: " + err.Error()
	} else {
		seen := map[uint64]bool{}
		for _, t := range tasks {
			if t.MM == 0 || seen[t.MM] {
				continue
			}
			seen[t.MM] = true
			as, err := k.ProcessAddressSpace(t)
			if err != nil {
				return fmt.Errorf("codearea: page tables of PID %d: %w", t.PID, err)
			}
			if err := scanKernelTables(k.Mem, as.Root(), k.LA57, k.DirectMapBase, refs, true); err != nil {
				return fmt.Errorf("codearea: page tables of PID %d: %w", t.PID, err)
			}
			refs.tables[as.Root()] = true
			procs++
		}
		what += fmt.Sprintf(", nor by the user page tables of %d processes", procs)
	}
	for p := uint64(0); p < lowMemEnd; p += pageSize {
		if _, bad := s.rep.Rejected[p]; bad {
			continue
		}
		if why := refs.references(p); why != "" {
			s.reject(p, why)
		}
	}
	s.rep.Checks = append(s.rep.Checks, what)
	return nil
}

func allZero(b []byte) bool {
	var z [256]byte
	for len(b) > 0 {
		n := min(len(b), len(z))
		if !bytes.Equal(b[:n], z[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Summary is one line per rejection reason with page counts, for logs.
func (r *LowMemReport) Summary() string {
	counts := map[string]int{}
	for _, why := range r.Rejected {
		counts[why]++
	}
	var lines []string
	for why, n := range counts {
		lines = append(lines, fmt.Sprintf("%3d pages: %s", n, why))
	}
	sort.Strings(lines)
	return fmt.Sprintf("%d free pages (%d KiB) in the first MiB; checked: %s\nrejected:\n%s",
		len(r.Free), len(r.Free)*pageSize/1024, strings.Join(r.Checks, "; "), strings.Join(lines, "\n"))
}
