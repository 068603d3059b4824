package hypervisor

import (
	"bytes"
	"os"
	"testing"
)

// FuzzParseELFDump: any bytes as a dump file are parsed or refused with an
// error, never a panic or an allocation beyond the limits; what is
// accepted holds together.
func FuzzParseELFDump(f *testing.F) {
	f.Add(testDumpBytes())
	f.Add(buildELFDump([]dumpSeg{{typ: 4, data: qemuNote(0x1000)}, {typ: 1, data: make([]byte, 64)}}))
	f.Add(buildELFDump([]dumpSeg{{typ: 4, data: qemuNote(1), filesz: 1 << 40}, {typ: 1, data: make([]byte, 64)}}))
	f.Add([]byte("\x7fELF"))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := parseELFDump(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		for i, r := range d.regions {
			if r.Size == 0 || r.End() < r.GPA || i > 0 && r.GPA < d.regions[i-1].End() {
				t.Fatalf("region %d: %+v", i, r)
			}
			if d.offsets[i] < 0 || uint64(d.offsets[i])+r.Size > uint64(len(b)) {
				t.Fatalf("region %d at file offset %d past the file", i, d.offsets[i])
			}
		}
		if len(d.cpus) > maxDumpCPUs {
			t.Fatalf("%d cpus", len(d.cpus))
		}
	})
}

// FuzzParseMonitor: "info mtree -f" and "info registers -a" output, real
// and damaged, parse or fail with an error.
func FuzzParseMonitor(f *testing.F) {
	for _, name := range []string{"testdata/mtree-4g.txt", "testdata/registers-2cpu.txt"} {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
	f.Add("CPU#0\nRIP=ffffffff81000000 RSP=0 CR0=80050033 CR3=1000 CR4=0 EFER=d01 GDT= 0 0 IDT= 0 0 GS =0 0 0 0 CPL=0\n")
	f.Fuzz(func(t *testing.T, s string) {
		if ram, err := parseMtree(s); err == nil {
			for i, p := range ram {
				if p.Size == 0 || i > 0 && p.GPA < ram[i-1].GPA {
					t.Fatalf("piece %d: %+v", i, p)
				}
			}
		}
		if cpus, err := parseRegisters(s); err == nil && len(cpus) == 0 {
			t.Fatal("no CPUs and no error")
		}
	})
}
