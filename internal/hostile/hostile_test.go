package hostile

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
)

// tinyCore writes a minimal QEMU-style ELF core: one QEMU CPU note and
// one memory segment of size bytes at guest-physical 0 holding data at 0x2000.
func tinyCore(t *testing.T, size int) string {
	le := binary.LittleEndian
	const phoff, descsz = 64, qnCR3 + 8 + 64
	noteOff := phoff + 2*56
	noteLen := 12 + 8 + descsz
	loadOff := 8192
	b := make([]byte, loadOff+size)
	copy(b, "\x7fELF\x02\x01\x01")
	le.PutUint16(b[16:], 4)  // ET_CORE
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], phoff)
	le.PutUint16(b[52:], 64)
	le.PutUint16(b[54:], 56)
	le.PutUint16(b[56:], 2)
	ph := func(i int, typ uint32, off, paddr, filesz uint64) {
		p := b[phoff+i*56:]
		le.PutUint32(p, typ)
		le.PutUint64(p[8:], off)
		le.PutUint64(p[24:], paddr)
		le.PutUint64(p[32:], filesz)
		le.PutUint64(p[40:], filesz)
	}
	ph(0, 4, uint64(noteOff), 0, uint64(noteLen))
	ph(1, 1, uint64(loadOff), 0, uint64(size))
	n := b[noteOff:]
	le.PutUint32(n, 5)
	le.PutUint32(n[4:], descsz)
	copy(n[12:], "QEMU")
	desc := n[20:]
	le.PutUint32(desc[4:], descsz)
	le.PutUint64(desc[qnCR0:], 0x80050033)
	le.PutUint64(desc[qnCR3:], 0x1000)
	copy(b[loadOff+0x2000:], "guest data")
	path := filepath.Join(t.TempDir(), "tiny.elf")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestFileCases writes every file-level case of a small core and opens
// each as hvpatch does: an error for every damaged header, the registers
// changed where a case changes them, memory edits where they belong, and
// the copies sparse where the original holds zero pages.
func TestFileCases(t *testing.T) {
	path := tinyCore(t, 1<<20)
	loads, err := readLoads(path)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := fileCases(path)
	if err != nil {
		t.Fatal(err)
	}
	c := &Corpus{Clean: path, loads: loads}
	cs = append(cs, Case{Name: "mem", Mem: []Edit{{0x2000, []byte("GUEST")}, {0xffffe, []byte("ab")}}})
	dir := t.TempDir()
	opens := map[string]bool{"cr3-outside-ram": true, "cr3-kernel-text": true, "cr3-mmio": true, "paging-off": true, "elf-no-notes": true, "mem": true}
	for _, cs := range cs {
		out := filepath.Join(dir, cs.Name)
		if err := c.Write(cs, out); err != nil {
			t.Fatalf("%s: %v", cs.Name, err)
		}
		d, err := hypervisor.OpenELFDump(out)
		if opens[cs.Name] != (err == nil) {
			t.Errorf("%s (%s): open: %v", cs.Name, cs.What, err)
			continue
		}
		if err != nil {
			if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "%!") {
				t.Errorf("%s: error %q is not one clean line", cs.Name, err)
			}
			continue
		}
		cpus := d.CPUs()
		switch cs.Name {
		case "cr3-outside-ram":
			if len(cpus) != 1 || cpus[0].CR3 != outside {
				t.Errorf("%s: CPUs %+v", cs.Name, cpus)
			}
		case "paging-off":
			if len(cpus) != 1 || cpus[0].CR0&(1<<31) != 0 {
				t.Errorf("%s: CPUs %+v", cs.Name, cpus)
			}
		case "elf-no-notes":
			if len(cpus) != 0 {
				t.Errorf("%s: CPUs %+v", cs.Name, cpus)
			}
		case "mem":
			got := make([]byte, 10)
			d.ReadPhys(0x2000, got)
			end := make([]byte, 2)
			d.ReadPhys(0xffffe, end)
			if string(got) != "GUEST data" || string(end) != "ab" {
				t.Errorf("mem: %q %q", got, end)
			}
		}
		d.Close()
	}
	// Sparse: the copy of a 1 MiB segment of zeros (but one page) takes
	// a few blocks.
	var st, st2 os.FileInfo
	st, _ = os.Stat(path)
	st2, _ = os.Stat(filepath.Join(dir, "mem"))
	if st.Size() != st2.Size() {
		t.Errorf("copy of %d bytes is %d", st.Size(), st2.Size())
	}
	b, _ := os.ReadFile(filepath.Join(dir, "mem"))
	a, _ := os.ReadFile(path)
	copy(a[8192+0x2000:], "GUEST")
	copy(a[8192+0xffffe:], "ab")
	if !bytes.Equal(a, b) {
		t.Errorf("the copy differs from the original beyond the edits")
	}
}
