package hypervisor

import (
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseMtree(t *testing.T) {
	b, err := os.ReadFile("testdata/mtree-4g.txt")
	if err != nil {
		t.Fatal(err)
	}
	ram, err := parseMtree(string(b))
	if err != nil {
		t.Fatal(err)
	}
	// The pc.ram pieces below 1 MiB are adjacent in the block (ram and
	// rom modes alternate) and merge; VGA RAM and the BIOS ROM are not RAM;
	// the SMM view (FlatView #2, different high RAM) must not be used.
	want := []ramPiece{
		{Region{0, 0xc0000000, "pc.ram"}, "pc.ram", 0},
		{Region{0x100000000, 0x40000000, "pc.ram@4G"}, "pc.ram", 0xc0000000},
	}
	if len(ram) != len(want) {
		t.Fatalf("got %+v, want %+v", ram, want)
	}
	for i := range want {
		if ram[i] != want[i] {
			t.Errorf("piece %d: got %+v, want %+v", i, ram[i], want[i])
		}
	}
	if _, err := parseMtree("FlatView #0\n AS \"I/O\", root: io\n"); err == nil {
		t.Error("output without the memory address space parsed without error")
	}
}

func TestParseRegisters(t *testing.T) {
	b, err := os.ReadFile("testdata/registers-2cpu.txt")
	if err != nil {
		t.Fatal(err)
	}
	cpus, err := parseRegisters(string(b))
	if err != nil {
		t.Fatal(err)
	}
	// CPU#1 of the fixture was edited to be in user mode with LA57 set.
	want := []CPUState{
		{Index: 0, RIP: 0xffffffffa8493f8f, RSP: 0xffffffffa9403e88, CR0: 0x80050033, CR3: 0x1009ca000, CR4: 0x6f0,
			EFER: 0xd01, GDTBase: 0xfffffe5152969000, IDTBase: 0xfffffe0000000000, GSBase: 0xffff8d2afbc00000, CPL: 0},
		{Index: 1, RIP: 0x7f1234567890, RSP: 0xffffcd34c00c3ed8, CR0: 0x80050033, CR3: 0x1009d4000, CR4: 0x16f0,
			EFER: 0xd01, GDTBase: 0xfffffe57cb065000, IDTBase: 0xfffffe0000000000, GSBase: 0, CPL: 3},
	}
	if len(cpus) != 2 {
		t.Fatalf("got %d CPUs, want 2", len(cpus))
	}
	for i := range want {
		if cpus[i] != want[i] {
			t.Errorf("CPU %d:\n got %+v\nwant %+v", i, cpus[i], want[i])
		}
	}
	if cpus[1].InKernel() || cpus[1].CR4&CR4LA57 == 0 {
		t.Errorf("CPU 1 should be in user mode with LA57")
	}
	broken := strings.Replace(string(b), "EFER=", "XEFER=", 1)
	if _, err := parseRegisters(broken); err == nil || !strings.Contains(err.Error(), "EFER") {
		t.Errorf("output without EFER: err = %v, want one naming EFER", err)
	}
}

func TestSplitAccess(t *testing.T) {
	regs := []Region{{0, 0x1000, "a"}, {0x1000, 0x1000, "b"}, {0x4000, 0x100, "c"}}
	spans, err := splitAccess(regs, "read", 0xff0, 0x20)
	if err != nil {
		t.Fatal(err)
	}
	want := []span{{0, 0xff0, 0, 0x10}, {1, 0, 0x10, 0x20}}
	if len(spans) != 2 || spans[0] != want[0] || spans[1] != want[1] {
		t.Errorf("spans across a region boundary: %+v, want %+v", spans, want)
	}
	for _, c := range []struct {
		gpa  uint64
		n    int
		hole string
	}{{0x1ff0, 0x20, "0x2000"}, {0x3fff, 2, "0x3fff"}, {0x40f0, 0x20, "0x4100"}, {^uint64(0) - 4, 8, "wraps"}} {
		_, err := splitAccess(regs, "write", c.gpa, c.n)
		var ae *AccessError
		if !errors.As(err, &ae) || !strings.Contains(err.Error(), c.hole) || ae.Op != "write" {
			t.Errorf("access %#x+%d: err = %v, want an AccessError mentioning %s", c.gpa, c.n, err, c.hole)
		}
	}
}

// TestMemfdFault: a mapping whose file shrank faults with SIGBUS; the
// backend must turn that into an error, not crash.
func TestMemfdFault(t *testing.T) {
	fd, err := unix.MemfdCreate("hvpatch-test", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	const size = 1 << 16
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	data, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	m := &memfdMem{domain: "test", data: data, regions: []Region{{0x100000, size, "ram"}}, slices: [][]byte{data}}
	defer m.Close()
	if err := m.WritePhys(0x100000+size-4, []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if err := m.ReadPhys(0x100000+size-4, got); err != nil || string(got) != "\x01\x02\x03\x04" {
		t.Fatalf("read back %x, %v", got, err)
	}
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	err = m.ReadPhys(0x100000+size-4, got)
	var ae *AccessError
	if !errors.As(err, &ae) || !strings.Contains(err.Error(), "fault") {
		t.Fatalf("read of a truncated mapping: err = %v, want an AccessError about a fault", err)
	}
	m.Close()
	if err := m.ReadPhys(0x100000, got); err == nil {
		t.Error("read after Close succeeded")
	}
}

// TestQEMUNotes builds a QEMU per-CPU note by the documented layout and
// checks every field hvpatch takes from it.
func TestQEMUNotes(t *testing.T) {
	desc := make([]byte, qnKernelGSBase+8)
	le := binary.LittleEndian
	le.PutUint32(desc[0:], 1)
	le.PutUint32(desc[4:], uint32(len(desc)))
	le.PutUint64(desc[qnRSP:], 0xffffc90000003f00)
	le.PutUint64(desc[qnRIP:], 0xffffffff81000010)
	le.PutUint32(desc[qnSegs:], 0x10)           // cs selector
	le.PutUint32(desc[qnSegs+8:], 1<<21)        // cs flags: L
	le.PutUint64(desc[qnSegs+4*24+16:], 0x1111) // gs base
	le.PutUint64(desc[qnSegs+8*24+16:], 0x2222) // gdt base
	le.PutUint64(desc[qnSegs+9*24+16:], 0x3333) // idt base
	le.PutUint64(desc[qnCR:], 0x80050033)
	le.PutUint64(desc[qnCR+24:], 0x1234000)
	le.PutUint64(desc[qnCR+32:], 0x3606f0)
	le.PutUint64(desc[qnKernelGSBase:], 0x4444)
	note := func(name string, typ uint32, d []byte) []byte {
		var b []byte
		b = le.AppendUint32(b, uint32(len(name)+1))
		b = le.AppendUint32(b, uint32(len(d)))
		b = le.AppendUint32(b, typ)
		b = append(b, name...)
		for len(b)%4 != 0 || len(b) < 12+len(name)+1 {
			b = append(b, 0)
		}
		b = append(b, d...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	blob := append(note("CORE", 1, make([]byte, 336)), note("QEMU", 0, desc)...)
	cpus, err := parseQEMUNotes(blob)
	if err != nil {
		t.Fatal(err)
	}
	want := CPUState{RIP: 0xffffffff81000010, RSP: 0xffffc90000003f00, CR0: 0x80050033, CR3: 0x1234000, CR4: 0x3606f0,
		EFER: 0x500, GSBase: 0x1111, GDTBase: 0x2222, IDTBase: 0x3333, KernelGSBase: 0x4444, CPL: 0}
	if len(cpus) != 1 || cpus[0] != want {
		t.Fatalf("got %+v\nwant %+v", cpus, want)
	}
	if _, err := parseQEMUNotes(note("QEMU", 0, desc[:100])); err == nil {
		t.Error("short QEMU note accepted")
	}
}
