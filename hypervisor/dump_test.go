package hypervisor

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func testDump(t *testing.T, lg *liveGuest) {
	ctx, d := lg.ctx, lg.d
	mem, err := d.OpenPhysMem(ctx, "memfd")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	dir := t.TempDir()

	// 1. A dump of the running guest: kernel text reads the same.
	text := gva2gpa(t, lg, guestSymbol(t, lg, "_stext"))
	etext := gva2gpa(t, lg, guestSymbol(t, lg, "_etext"))
	running := filepath.Join(dir, "running.elf")
	t0 := time.Now()
	if err := d.DumpMemory(ctx, running); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	dump, err := OpenELFDump(running)
	if err != nil {
		t.Fatal(err)
	}
	if etext <= text || etext-text > 64<<20 {
		t.Fatalf("kernel text %#x-%#x is implausible", text, etext)
	}
	live := make([]byte, etext-text)
	off := make([]byte, etext-text)
	if err := mem.ReadPhys(text, live); err != nil {
		t.Fatal(err)
	}
	if err := dump.ReadPhys(text, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(live, off) {
		for i := range live {
			if live[i] != off[i] {
				t.Fatalf("kernel text differs between live guest and dump at gpa %#x: %x vs %x", text+uint64(i), live[i:i+8], off[i:i+8])
			}
		}
	}
	t.Logf("dump of the running guest took %v; %d MiB of kernel text at %#x equal", took, len(live)>>20, text)
	dump.Close()
	os.Remove(running)

	// 2. A dump of the paused guest: registers and any address agree.
	if err := d.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	defer d.Resume(ctx)
	cpus, err := d.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	paused := filepath.Join(dir, "paused.elf")
	if err := d.DumpMemory(ctx, paused); err != nil {
		t.Fatal(err)
	}
	dump, err = OpenELFDump(paused)
	if err != nil {
		t.Fatal(err)
	}
	defer dump.Close()
	if sz := qemuNoteSize(t, paused); sz < qnKernelGSBase+8 {
		t.Logf("QEMU CPU notes are %d bytes: no kernel_gs_base (QEMU before 5.2)", sz)
	} else {
		t.Logf("QEMU CPU notes are %d bytes, with kernel_gs_base", sz)
	}
	dcpus := dump.CPUs()
	if len(dcpus) != len(cpus) {
		t.Fatalf("dump has %d CPU notes, guest %d vCPUs", len(dcpus), len(cpus))
	}
	for i, c := range cpus {
		dc := dcpus[i]
		t.Logf("CPU %d: RIP %#x CR3 %#x CPL %d, kernel_gs_base %#x (from the note)", i, dc.RIP, dc.CR3, dc.CPL, dc.KernelGSBase)
		dc.KernelGSBase, c.KernelGSBase = 0, 0
		c.EFER &= 1<<8 | 1<<10 // only LME|LMA can be derived from a note
		if dc != c {
			t.Errorf("CPU %d:\ndump %+v\nlive %+v", i, dc, c)
		}
	}
	liveRegs, dumpRegs := mem.Regions(), dump.Regions()
	for _, r := range liveRegs {
		i := findRegion(dumpRegs, r.GPA)
		j := findRegion(dumpRegs, r.End()-1)
		if i < 0 || j < 0 {
			t.Errorf("live RAM %s %#x-%#x is not in the dump (segments %v)", r.Name, r.GPA, r.End(), dumpRegs)
		}
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
	nonzero := 0
	for i := 0; i < 300; i++ {
		r := liveRegs[rng.IntN(len(liveRegs))]
		n := 1 + rng.IntN(4096)
		gpa := r.GPA + rng.Uint64N(r.Size-uint64(n))
		a, b := make([]byte, n), make([]byte, n)
		if err := mem.ReadPhys(gpa, a); err != nil {
			t.Fatal(err)
		}
		if err := dump.ReadPhys(gpa, b); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Fatalf("%d bytes at %#x differ between live guest and paused dump", n, gpa)
		}
		if !bytes.Equal(a, make([]byte, n)) {
			nonzero++
		}
	}
	if nonzero < 30 {
		t.Errorf("only %d of 300 samples hold data", nonzero)
	}
	// Reads across adjacent dump segments, and errors for holes and writes.
	for k := 1; k < len(dumpRegs); k++ {
		if dumpRegs[k-1].End() == dumpRegs[k].GPA {
			a, b := make([]byte, 64), make([]byte, 64)
			mem.ReadPhys(dumpRegs[k].GPA-32, a)
			if err := dump.ReadPhys(dumpRegs[k].GPA-32, b); err != nil || !bytes.Equal(a, b) {
				t.Errorf("read across dump segments at %#x: %v, equal %v", dumpRegs[k].GPA, err, bytes.Equal(a, b))
			}
		}
	}
	var ae *AccessError
	if err := dump.ReadPhys(0xfec00000, make([]byte, 8)); !errors.As(err, &ae) {
		t.Errorf("dump read of MMIO: %v", err)
	}
	if err := dump.WritePhys(0x1000, []byte{1}); !errors.Is(err, ErrReadOnly) {
		t.Errorf("dump write: %v, want ErrReadOnly", err)
	}
	t.Logf("paused dump: %d segments %v, %d CPUs equal to the monitor's, 300 random reads equal (%d with data)", len(dumpRegs), dumpRegs, len(dcpus), nonzero)

	// 3. A raw image cut from live memory, at its own base.
	const base, size = 0x1000000, 4 << 20
	img := make([]byte, size)
	if err := mem.ReadPhys(base, img); err != nil {
		t.Fatal(err)
	}
	rawPath := filepath.Join(dir, "img.raw")
	os.WriteFile(rawPath, img, 0o600)
	raw, err := OpenRaw(rawPath, base)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	got := make([]byte, 4096)
	for _, a := range []uint64{base, base + 12345, base + size - 4096} {
		if err := raw.ReadPhys(a, got); err != nil || !bytes.Equal(got, img[a-base:a-base+4096]) {
			t.Errorf("raw read at %#x: %v", a, err)
		}
	}
	if err := raw.ReadPhys(base+size-8, got[:16]); !errors.As(err, &ae) {
		t.Errorf("raw read past the end: %v", err)
	}
	if err := raw.WritePhys(base, got[:1]); !errors.Is(err, ErrReadOnly) {
		t.Errorf("raw write: %v", err)
	}
}

// qemuNoteSize reads the size field of the first QEMU CPU note.
func qemuNoteSize(t *testing.T, path string) uint32 {
	ef, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	for _, p := range ef.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, p.Filesz)
		p.ReadAt(b, 0)
		for len(b) >= 12 {
			nsz, dsz := binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])
			desc := 12 + int(align4(nsz))
			if string(b[12:12+nsz-1]) == "QEMU" {
				return binary.LittleEndian.Uint32(b[desc+4:])
			}
			b = b[desc+int(align4(dsz)):]
		}
	}
	t.Fatal("no QEMU note in the dump")
	return 0
}
