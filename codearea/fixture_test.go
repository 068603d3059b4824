package codearea

import (
	"context"
	"encoding/binary"
	"errors"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// ramMem is guest RAM as a byte slice from guest-physical 0.
type ramMem struct{ b []byte }

func (m *ramMem) check(op string, gpa uint64, n int) error {
	if gpa+uint64(n) > uint64(len(m.b)) || gpa+uint64(n) < gpa {
		return &hypervisor.AccessError{Op: op, GPA: gpa, Len: n, What: "not RAM"}
	}
	return nil
}
func (m *ramMem) ReadPhys(gpa uint64, p []byte) error {
	if err := m.check("read", gpa, len(p)); err != nil {
		return err
	}
	copy(p, m.b[gpa:])
	return nil
}
func (m *ramMem) WritePhys(gpa uint64, p []byte) error {
	if err := m.check("write", gpa, len(p)); err != nil {
		return err
	}
	copy(m.b[gpa:], p)
	return nil
}
func (m *ramMem) Regions() []hypervisor.Region {
	return []hypervisor.Region{{GPA: 0, Size: uint64(len(m.b)), Name: "pc.ram"}}
}
func (m *ramMem) Close() error { return nil }

func (m *ramMem) put64(gpa, v uint64) { binary.LittleEndian.PutUint64(m.b[gpa:], v) }

// Fixture layout: a 4-level kernel in 8 MiB of RAM.
const (
	fxPGD       = 0x200000
	fxPUDKernel = 0x201000
	fxPUDDirect = 0x202000
	fxPUDVmall  = 0x205000
	fxPMDVmall  = 0x203000
	fxPTVmall   = 0x204000
	fxImagePA   = 0x400000 // 2 MiB kernel image
	fxPMDKernel = 0x403000 // level2_kernel_pgt, inside the image
	fxText      = 0xffffffff81000000
	fxDirect    = 0xffff888000000000
	fxVmalloc   = 0xffffc90000000000
	fxTramp     = 0x98000
	fxTrampSize = 0x6000
	fxMapped    = 0x30000 // a low page some vmalloc mapping uses
	fxTable     = 0x40000 // a low page that is an (empty) page table
	fxDirty     = 0x21000 // a low page with data in it
)

func newFixture() (*introspect.Kernel, *ramMem) {
	m := &ramMem{b: make([]byte, 8<<20)}
	idx := func(va uint64, level int) uint64 { return (va >> (12 + 9*(level-1))) & 511 }
	tbl := uint64(ptePresent | pteWritable)
	// Kernel image: PGD -> PUD[510] -> level2_kernel_pgt -> one 2 MiB page.
	m.put64(fxPGD+idx(fxText, 4)*8, fxPUDKernel|tbl)
	m.put64(fxPUDKernel+idx(fxText, 3)*8, fxPMDKernel|tbl)
	m.put64(fxPMDKernel+idx(fxText, 2)*8, fxImagePA|tbl|ptePS)
	// Direct map: one 1 GiB page of everything.
	m.put64(fxPGD+idx(fxDirect, 4)*8, fxPUDDirect|tbl)
	m.put64(fxPUDDirect, 0|tbl|ptePS|pteNX)
	// vmalloc: a 4 KiB mapping of fxMapped, and an empty table at fxTable.
	m.put64(fxPGD+idx(fxVmalloc, 4)*8, fxPUDVmall|tbl)
	m.put64(fxPUDVmall, fxPMDVmall|tbl)
	m.put64(fxPMDVmall, fxPTVmall|tbl)
	m.put64(fxPMDVmall+8, fxTable|tbl)
	m.put64(fxPTVmall, fxMapped|tbl|pteNX)
	// BIOS data area: EBDA at 0x9fc00, 639 KiB of base memory.
	binary.LittleEndian.PutUint16(m.b[0x40e:], 0x9fc0)
	binary.LittleEndian.PutUint16(m.b[0x413:], 639)
	// The trampoline (non-zero, as in a guest) and one dirty page.
	for i := uint64(0); i < fxTrampSize; i += 64 {
		m.b[fxTramp+i] = 0x90
	}
	m.b[fxDirty+100] = 1
	// Symbols: real_mode_header points at the trampoline through the
	// direct map.
	syms := []symbols.Symbol{
		{Name: "_text", Addr: fxText, Type: 'T'},
		{Name: "real_mode_header", Addr: fxText + 0x1000, Type: 'D'},
		{Name: "real_mode_blob", Addr: fxText + 0x2000, Type: 'D'},
		{Name: "real_mode_blob_end", Addr: fxText + 0x2000 + fxTrampSize - 0x10, Type: 'D'},
		{Name: "level2_kernel_pgt", Addr: fxText + (fxPMDKernel - fxImagePA), Type: 'D'},
		{Name: "version_proc_show", Addr: fxText + 0x10000, Type: 't'},
		{Name: "seq_printf", Addr: fxText + 0x10100, Type: 'T'},
		{Name: "init_uts_ns", Addr: fxText + 0x11000, Type: 'D'},
		{Name: "_end", Addr: fxText + 0x200000, Type: 'B'},
	}
	m.put64(fxImagePA+0x1000, fxDirect+fxTramp)
	// version_proc_show: fentry NOP, xor eax,eax, ret.
	copy(m.b[fxImagePA+0x10000:], []byte{0x0f, 0x1f, 0x44, 0x00, 0x00, 0x31, 0xc0, 0xc3, 0xcc})
	k := &introspect.Kernel{
		Mem:           m,
		AS:            introspect.NewAddressSpace(m, fxPGD, false),
		CR3:           fxPGD,
		TextStart:     fxText,
		TextEnd:       fxText + 0x200000,
		DirectMapBase: fxDirect,
		Symbols:       symbols.NewTable(syms),
	}
	return k, m
}

// memWriter is a CodeWriter over a PhysMem that writes by guest-physical
// address, as the direct writer does. failAt makes the write of that
// number (1-based, counted over the writer's life) fail after changing
// memory; corrupt makes it write different bytes than asked.
type memWriter struct {
	mem     hypervisor.PhysMem
	cpus    []hypervisor.CPUState
	writes  int
	failAt  int
	corrupt bool
}

func (w *memWriter) Name() string { return "test" }
func (w *memWriter) Capabilities() hypervisor.Capabilities {
	return hypervisor.Capabilities{Registers: true}
}
func (w *memWriter) Stop(ctx context.Context) (hypervisor.StoppedGuest, error) {
	return &memStopped{w}, nil
}

type memStopped struct{ w *memWriter }

func (s *memStopped) Read(va, gpa uint64, p []byte) error { return s.w.mem.ReadPhys(gpa, p) }
func (s *memStopped) Write(va, gpa uint64, p []byte) error {
	s.w.writes++
	if s.w.writes == s.w.failAt {
		bad := append([]byte(nil), p...)
		bad[0] ^= 0xff
		if err := s.w.mem.WritePhys(gpa, bad); err != nil {
			return err
		}
		if !s.w.corrupt {
			return errors.New("injected write failure")
		}
		return nil
	}
	return s.w.mem.WritePhys(gpa, p)
}
func (s *memStopped) Registers(context.Context) ([]hypervisor.CPUState, error) { return s.w.cpus, nil }
func (s *memStopped) Resume() (hypervisor.FreezeReport, error) {
	return hypervisor.FreezeReport{Window: time.Microsecond, Method: "test"}, nil
}
