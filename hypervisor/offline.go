package hypervisor

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
)

// fileMem is a read-only guest-physical image: regions backed by ranges
// of a file (pread, so a truncated file is an error, never a fault).
type fileMem struct {
	path    string
	f       *os.File
	regions []Region
	offsets []int64 // file offset of each region
	mu      sync.RWMutex
}

func (m *fileMem) Regions() []Region { return m.regions }

func (m *fileMem) ReadPhys(gpa uint64, p []byte) error {
	spans, err := splitAccess(m.regions, "read", gpa, len(p))
	if err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.f == nil {
		return &AccessError{Op: "read", GPA: gpa, Len: len(p), What: m.path + " is closed"}
	}
	for _, s := range spans {
		off := m.offsets[s.idx] + int64(s.off)
		if _, err := m.f.ReadAt(p[s.lo:s.hi], off); err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("file ends before offset %d (truncated?)", off+int64(s.hi-s.lo))
			}
			return &AccessError{Op: "read", GPA: gpa, Len: len(p), What: fmt.Sprintf("%s: %v", m.path, err)}
		}
	}
	return nil
}

func (m *fileMem) WritePhys(gpa uint64, p []byte) error {
	return fmt.Errorf("%s: write of %d bytes at %#x: %w", m.path, len(p), gpa, ErrReadOnly)
}

func (m *fileMem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.f == nil {
		return nil
	}
	err := m.f.Close()
	m.f = nil
	return err
}

// OpenRaw opens a raw memory image whose first byte is guest-physical base.
func OpenRaw(path string, base uint64) (PhysMem, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if st.Size() == 0 || base+uint64(st.Size()) < base {
		f.Close()
		return nil, fmt.Errorf("raw image %s: %d bytes at base %#x do not make a memory range", path, st.Size(), base)
	}
	return &fileMem{path: path, f: f, regions: []Region{{GPA: base, Size: uint64(st.Size()), Name: "raw"}}, offsets: []int64{0}}, nil
}

// Dump is an ELF core of guest memory as QEMU writes it (virsh dump
// --memory-only --format elf, QMP dump-guest-memory): PT_LOAD segments
// carry guest-physical addresses, and a "QEMU" note per vCPU holds its
// registers.
type Dump struct {
	fileMem
	cpus []CPUState
}

// CPUs returns each vCPU's state from the QEMU notes. EFER is not in the
// notes; it is set to LME|LMA when the code segment is a 64-bit one.
func (d *Dump) CPUs() []CPUState { return d.cpus }

// OpenELFDump opens a QEMU ELF memory dump.
func OpenELFDump(path string) (*Dump, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	d, err := readELFDump(path, f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ELF dump %s: %w", path, err)
	}
	return d, nil
}

func readELFDump(path string, f *os.File) (*Dump, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	e, err := parseELFDump(f, st.Size())
	if err != nil {
		return nil, err
	}
	return &Dump{fileMem: fileMem{path: path, f: f, regions: e.regions, offsets: e.offsets}, cpus: e.cpus}, nil
}

// Limits on what a dump's headers may ask for. QEMU writes one CORE and one
// QEMU note per vCPU (under 1 KiB together), and at most a few PT_LOADs
// per RAM block.
const (
	maxDumpNotes = 16 << 20 // bytes of PT_NOTE, all segments together
	maxDumpCPUs  = 16384    // KVM allows 4096 vCPUs
)

// elfDump is what a dump's headers say.
type elfDump struct {
	regions []Region
	offsets []int64 // file offset of each region
	cpus    []CPUState
}

// parseELFDump reads the ELF header, program headers and notes of a dump of
// size bytes. Every size and offset is checked against the file before it
// is used, so a damaged or hostile dump is an error, never a panic or a
// giant allocation.
func parseELFDump(r io.ReaderAt, size int64) (*elfDump, error) {
	ef, err := elf.NewFile(io.NewSectionReader(r, 0, size))
	if err != nil {
		return nil, elfHeaderError(r, size, err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 || ef.Type != elf.ET_CORE {
		return nil, fmt.Errorf("not an x86-64 ELF core (class %v, machine %v, type %v)", ef.Class, ef.Machine, ef.Type)
	}
	d := &elfDump{}
	type load struct {
		r   Region
		off int64
	}
	var loads []load
	notes := uint64(0)
	fsize := uint64(size)
	for i, p := range ef.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			if p.Filesz == 0 {
				continue
			}
			if p.Filesz > fsize || p.Off > fsize-p.Filesz {
				return nil, fmt.Errorf("segment %d at guest-physical %#x needs file bytes %d-%d, the file has %d (truncated?)", i, p.Paddr, p.Off, p.Off+p.Filesz, fsize)
			}
			if p.Paddr+p.Filesz < p.Paddr {
				return nil, fmt.Errorf("segment %d at guest-physical %#x of %d bytes wraps around the address space", i, p.Paddr, p.Filesz)
			}
			loads = append(loads, load{Region{GPA: p.Paddr, Size: p.Filesz, Name: fmt.Sprintf("load@%#x", p.Paddr)}, int64(p.Off)})
		case elf.PT_NOTE:
			if p.Filesz > maxDumpNotes-notes {
				return nil, fmt.Errorf("note segment %d of %d bytes: more than %d bytes of notes in all (QEMU writes under 1 KiB per vCPU)", i, p.Filesz, maxDumpNotes)
			}
			if p.Filesz > fsize || p.Off > fsize-p.Filesz {
				return nil, fmt.Errorf("note segment %d needs file bytes %d-%d, the file has %d (truncated?)", i, p.Off, p.Off+p.Filesz, fsize)
			}
			notes += p.Filesz
			buf := make([]byte, p.Filesz)
			if _, err := r.ReadAt(buf, int64(p.Off)); err != nil {
				return nil, fmt.Errorf("reading note segment %d, file bytes %d-%d: %w", i, p.Off, p.Off+p.Filesz, err)
			}
			cpus, err := parseQEMUNotes(buf)
			if err != nil {
				return nil, fmt.Errorf("note segment %d at file offset %d: %w", i, p.Off, err)
			}
			d.cpus = append(d.cpus, cpus...)
			if len(d.cpus) > maxDumpCPUs {
				return nil, fmt.Errorf("more than %d vCPU notes", maxDumpCPUs)
			}
		}
	}
	if len(loads) == 0 {
		return nil, fmt.Errorf("no memory segments")
	}
	sort.Slice(loads, func(i, j int) bool { return loads[i].r.GPA < loads[j].r.GPA })
	for i, l := range loads {
		if i > 0 && l.r.GPA < loads[i-1].r.End() {
			return nil, fmt.Errorf("segments at %#x and %#x overlap", loads[i-1].r.GPA, l.r.GPA)
		}
		d.regions = append(d.regions, l.r)
		d.offsets = append(d.offsets, l.off)
	}
	for i := range d.cpus {
		d.cpus[i].Index = i
	}
	return d, nil
}

// elfHeaderError explains a failure to read the ELF header or the program
// headers: for a file that ends early, where it ends and what it cut.
func elfHeaderError(r io.ReaderAt, size int64, err error) error {
	if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("reading the ELF header and program headers: %w", err)
	}
	const ehdrSize = 64
	if size < ehdrSize {
		return fmt.Errorf("the file is %d bytes, shorter than an ELF header (%d): truncated (%w)", size, ehdrSize, err)
	}
	var h [ehdrSize]byte
	if _, rerr := r.ReadAt(h[:], 0); rerr == nil {
		le := binary.LittleEndian
		phoff, phentsize, phnum := le.Uint64(h[32:]), uint64(le.Uint16(h[54:])), uint64(le.Uint16(h[56:]))
		if phoff <= uint64(size) && phnum*phentsize <= uint64(size)-phoff {
			// The program headers are whole: what is missing is section
			// data, which QEMU writes after the memory (its section-name
			// table), so a dump cut anywhere in its memory ends here.
			return fmt.Errorf("the file ends at byte %d, before the ELF sections its headers describe (section headers at offset %d): truncated (%w)",
				size, le.Uint64(h[40:]), err)
		}
		return fmt.Errorf("the file ends at byte %d, inside the program headers (%d of %d bytes at offset %d): truncated (%w)",
			size, phnum, phentsize, phoff, err)
	}
	return fmt.Errorf("the file ends at byte %d, inside the ELF headers: truncated (%w)", size, err)
}

// Layout of QEMU's per-CPU note (QEMUCPUState, target/i386/arch_dump.c):
// version, size, 16 GPRs, rip, rflags, 10 segments of 24 bytes (cs ds es
// fs gs ss ldt tr gdt idt: selector, limit, flags, pad, base), cr[5], and
// since QEMU 5.2 kernel_gs_base.
const (
	qnRSP          = 8 + 6*8
	qnRIP          = 8 + 16*8
	qnSegs         = qnRIP + 16
	qnSegSize      = 24
	qnCR           = qnSegs + 10*qnSegSize
	qnKernelGSBase = qnCR + 5*8
	qnMinSize      = qnKernelGSBase
)

func parseQEMUNotes(b []byte) ([]CPUState, error) {
	var cpus []CPUState
	le := binary.LittleEndian
	for len(b) >= 12 {
		namesz, descsz, _ := le.Uint32(b), le.Uint32(b[4:]), le.Uint32(b[8:])
		nameEnd := 12 + align4(namesz)
		descEnd := nameEnd + align4(descsz)
		if descEnd > uint64(len(b)) {
			return nil, fmt.Errorf("note runs past its segment")
		}
		name := string(bytes.TrimRight(b[12:12+uint64(namesz)], "\x00"))
		desc := b[nameEnd : nameEnd+uint64(descsz)]
		b = b[descEnd:]
		if name != "QEMU" {
			continue
		}
		if len(desc) < qnMinSize {
			return nil, fmt.Errorf("QEMU CPU note of %d bytes, expected at least %d", len(desc), qnMinSize)
		}
		seg := func(i int) (sel, flags uint32, base uint64) {
			o := qnSegs + i*qnSegSize
			return le.Uint32(desc[o:]), le.Uint32(desc[o+8:]), le.Uint64(desc[o+16:])
		}
		csSel, csFlags, _ := seg(0)
		_, _, gsBase := seg(4)
		_, _, gdtBase := seg(8)
		_, _, idtBase := seg(9)
		c := CPUState{
			RIP: le.Uint64(desc[qnRIP:]), RSP: le.Uint64(desc[qnRSP:]),
			CR0: le.Uint64(desc[qnCR:]), CR3: le.Uint64(desc[qnCR+24:]), CR4: le.Uint64(desc[qnCR+32:]),
			GSBase: gsBase, GDTBase: gdtBase, IDTBase: idtBase, CPL: int(csSel & 3),
		}
		if csFlags&(1<<21) != 0 { // DESC_L_MASK: 64-bit code segment
			c.EFER = 1<<8 | 1<<10
		}
		if size := le.Uint32(desc[4:]); size >= qnKernelGSBase+8 && len(desc) >= qnKernelGSBase+8 {
			c.KernelGSBase = le.Uint64(desc[qnKernelGSBase:])
		}
		cpus = append(cpus, c)
	}
	return cpus, nil
}

func align4(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
