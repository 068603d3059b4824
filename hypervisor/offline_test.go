package hypervisor

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// qemuNote is a CORE and a QEMU note for one vCPU, laid out as QEMU's
// dump-guest-memory writes them.
func qemuNote(cr3 uint64) []byte {
	le := binary.LittleEndian
	desc := make([]byte, qnKernelGSBase+8)
	le.PutUint32(desc[0:], 1)
	le.PutUint32(desc[4:], uint32(len(desc)))
	le.PutUint64(desc[qnRIP:], 0xffffffff81000010)
	le.PutUint32(desc[qnSegs+8:], 1<<21)
	le.PutUint64(desc[qnCR:], 0x80050033)
	le.PutUint64(desc[qnCR+24:], cr3)
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
	return append(note("CORE", 1, make([]byte, 336)), note("QEMU", 0, desc)...)
}

// dumpSeg is one program header of a test dump: its data is placed in the
// file after the headers unless off is set.
type dumpSeg struct {
	typ         uint32
	paddr       uint64
	data        []byte
	off, filesz uint64 // override the computed offset and size when non-zero
}

// buildELFDump writes an x86-64 ELF core the way QEMU does: header,
// program headers, then each segment's bytes.
func buildELFDump(segs []dumpSeg) []byte {
	le := binary.LittleEndian
	const ehdr, phent = 64, 56
	b := make([]byte, ehdr+phent*len(segs))
	copy(b, "\x7fELF\x02\x01\x01")
	le.PutUint16(b[16:], 4)  // ET_CORE
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], ehdr) // e_phoff
	le.PutUint16(b[52:], ehdr)
	le.PutUint16(b[54:], phent)
	le.PutUint16(b[56:], uint16(len(segs)))
	for i, s := range segs {
		off, size := uint64(len(b)), uint64(len(s.data))
		b = append(b, s.data...)
		if s.off != 0 {
			off = s.off
		}
		if s.filesz != 0 {
			size = s.filesz
		}
		ph := b[ehdr+phent*i:]
		le.PutUint32(ph[0:], s.typ)
		le.PutUint64(ph[8:], off)
		le.PutUint64(ph[24:], s.paddr)
		le.PutUint64(ph[32:], size)
		le.PutUint64(ph[40:], size)
	}
	return b
}

func testDumpBytes() []byte {
	ram := bytes.Repeat([]byte("guest RAM "), 1000)
	return buildELFDump([]dumpSeg{
		{typ: 4, data: append(qemuNote(0x1000), qemuNote(0x2000)...)},
		{typ: 1, paddr: 0, data: ram[:4096]},
		{typ: 1, paddr: 1 << 20, data: ram[:8192]},
	})
}

func writeTemp(t *testing.T, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "dump.elf")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestOpenELFDumpSmall(t *testing.T) {
	d, err := OpenELFDump(writeTemp(t, testDumpBytes()))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if len(d.CPUs()) != 2 || d.CPUs()[1].CR3 != 0x2000 || len(d.Regions()) != 2 || d.Regions()[1].GPA != 1<<20 {
		t.Fatalf("cpus %+v regions %+v", d.CPUs(), d.Regions())
	}
	p := make([]byte, 10)
	if err := d.ReadPhys(1<<20+10, p); err != nil || string(p) != "guest RAM " {
		t.Errorf("read %q, %v", p, err)
	}
}

// A PT_NOTE whose size is huge made the dump reader allocate it: a
// makeslice panic or out of memory.
func TestOpenELFDumpHugeNote(t *testing.T) {
	for _, size := range []uint64{1 << 62, 1 << 40, 1<<31 + 5} {
		b := buildELFDump([]dumpSeg{{typ: 4, data: qemuNote(0x1000), filesz: size}, {typ: 1, data: make([]byte, 4096)}})
		_, err := OpenELFDump(writeTemp(t, b))
		if err == nil || !strings.Contains(err.Error(), "note") {
			t.Errorf("note of %d bytes: %v", size, err)
		}
	}
	// Offsets past the file, and sizes that overflow with them.
	for _, s := range []dumpSeg{
		{typ: 4, data: qemuNote(1), off: 1 << 63},
		{typ: 1, data: make([]byte, 8), off: 1<<64 - 4},
		{typ: 1, data: make([]byte, 8), paddr: 1<<64 - 4},
	} {
		_, err := OpenELFDump(writeTemp(t, buildELFDump([]dumpSeg{s, {typ: 1, paddr: 1 << 30, data: make([]byte, 8)}})))
		if err == nil {
			t.Errorf("segment %+v accepted", s)
		}
	}
}

// A truncated dump said only "EOF": the error must name the file, where it
// ends and what was being read.
func TestOpenELFDumpTruncated(t *testing.T) {
	full := testDumpBytes()
	for _, n := range []int{0, 10, 63, 64, 100, 64 + 56*3 - 1, 64 + 56*3 + 100, len(full) - 1} {
		p := writeTemp(t, full[:n])
		_, err := OpenELFDump(p)
		if err == nil {
			t.Errorf("%d bytes: accepted", n)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, p) || !strings.Contains(msg, "truncated") || strings.HasSuffix(msg, ": EOF") && !strings.Contains(msg, "(") {
			t.Errorf("%d bytes: %v", n, err)
		}
	}
}
