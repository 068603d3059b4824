package hostile

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
)

// Offsets in QEMU's per-CPU note (target/i386/arch_dump.c QEMUCPUState):
// version, size, 16 GPRs, rip, rflags, 10 segments of 24 bytes, cr[5].
const (
	qnCR0 = 8 + 16*8 + 16 + 10*24
	qnCR3 = qnCR0 + 3*8
)

// ELF64 header and program-header field offsets.
const (
	ehPhoff  = 32
	ehPhnum  = 56
	phType   = 0
	phOffset = 8
	phPaddr  = 24
	phFilesz = 32
)

// fileCases are the cases that alter the dump file itself: the ELF and
// program headers, the notes with the vCPU registers, the file's length.
func fileCases(path string) ([]Case, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	size := st.Size()
	ef, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer ef.Close()
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var eh [64]byte
	if _, err := f.ReadAt(eh[:], 0); err != nil {
		return nil, err
	}
	phoff := int64(binary.LittleEndian.Uint64(eh[ehPhoff:]))
	phdr := func(i int) int64 { return phoff + int64(i)*56 }
	var cs []Case
	add := func(name, what string, edits ...FileEdit) {
		cs = append(cs, Case{Name: name, What: what, File: edits})
	}
	noteIdx, firstLoad, secondLoad := -1, -1, -1
	for i, p := range ef.Progs {
		switch {
		case p.Type == elf.PT_NOTE && noteIdx < 0:
			noteIdx = i
		case p.Type == elf.PT_LOAD && p.Filesz > 0 && firstLoad < 0:
			firstLoad = i
		case p.Type == elf.PT_LOAD && p.Filesz > 0 && secondLoad < 0:
			secondLoad = i
		}
	}
	if noteIdx < 0 || firstLoad < 0 {
		return nil, fmt.Errorf("hostile: %s has no notes or no memory segments", path)
	}
	note := ef.Progs[noteIdx]

	// The vCPU registers: every QEMU note's CR3 (or CR0) rewritten.
	raw := make([]byte, note.Filesz)
	if _, err := f.ReadAt(raw, int64(note.Off)); err != nil {
		return nil, err
	}
	var cr3s, cr0s []int64 // file offsets
	for o := 0; o+12 <= len(raw); {
		nsz, dsz := binary.LittleEndian.Uint32(raw[o:]), binary.LittleEndian.Uint32(raw[o+4:])
		name := o + 12
		desc := name + int(nsz+3)&^3
		next := desc + int(dsz+3)&^3
		if next > len(raw) {
			break
		}
		if string(bytes.TrimRight(raw[name:name+int(nsz)], "\x00")) == "QEMU" && dsz >= qnCR3+8 {
			cr3s = append(cr3s, int64(note.Off)+int64(desc+qnCR3))
			cr0s = append(cr0s, int64(note.Off)+int64(desc+qnCR0))
		}
		o = next
	}
	if len(cr3s) > 0 {
		set := func(offs []int64, v uint64) []FileEdit {
			var es []FileEdit
			for _, o := range offs {
				es = append(es, FileEdit{o, le64(v)})
			}
			return es
		}
		add("cr3-outside-ram", "every vCPU's CR3 points beyond RAM", set(cr3s, outside)...)
		add("cr3-kernel-text", "every vCPU's CR3 points at the kernel's first page (code taken for a page table)", set(cr3s, 0x1000000)...)
		add("cr3-mmio", "every vCPU's CR3 points into the IOAPIC's MMIO hole", set(cr3s, 0xfec00000)...)
		add("paging-off", "every vCPU's CR0 says paging is off", set(cr0s, 0x10)...)
	}

	// ELF and program headers.
	add("elf-note-huge", "PT_NOTE of 1 TiB (makeslice panic or out-of-memory)", FileEdit{phdr(noteIdx) + phFilesz, le64(1 << 40)})
	add("elf-note-size-max", "PT_NOTE of 2^64-1 bytes", FileEdit{phdr(noteIdx) + phFilesz, le64(^uint64(0))})
	add("elf-note-offset-huge", "PT_NOTE at file offset 2^62", FileEdit{phdr(noteIdx) + phOffset, le64(1 << 62)})
	add("elf-note-descsz-huge", "the first note's descsz 0xfffffff0", FileEdit{int64(note.Off) + 4, le32(0xfffffff0)})
	add("elf-note-namesz-huge", "the first note's namesz 0xfffffffc", FileEdit{int64(note.Off), le32(0xfffffffc)})
	add("elf-load-beyond-file", "the first memory segment at file offset 2^50", FileEdit{phdr(firstLoad) + phOffset, le64(1 << 50)})
	add("elf-load-huge", "the first memory segment of 2^63 bytes", FileEdit{phdr(firstLoad) + phFilesz, le64(1 << 63)})
	add("elf-load-wraps", "the first memory segment at guest-physical 2^64-4096", FileEdit{phdr(firstLoad) + phPaddr, le64(^uint64(0) - 4095)})
	if secondLoad >= 0 {
		add("elf-loads-overlap", "two memory segments at the same guest-physical address",
			FileEdit{phdr(secondLoad) + phPaddr, le64(ef.Progs[firstLoad].Paddr)})
	}
	add("elf-phnum-huge", "65535 program headers", FileEdit{ehPhnum, []byte{0xff, 0xff}})
	add("elf-phoff-huge", "program headers at file offset 2^62", FileEdit{ehPhoff, le64(1 << 62)})
	add("elf-no-notes", "the note segment turned into PT_NULL: no vCPU registers", FileEdit{phdr(noteIdx) + phType, le32(0)})
	add("elf-not-core", "ELF type ET_EXEC", FileEdit{16, []byte{2, 0}})

	// Truncated files.
	cut := func(name, what string, at int64) {
		cs = append(cs, Case{Name: name, What: what, Cut: true, CutAt: at})
	}
	cut("truncated-half", "the dump cut at half its length (said only \"EOF\")", size/2)
	cut("truncated-in-headers", "the dump cut inside the program headers", phoff+30)
	cut("truncated-in-notes", "the dump cut inside the notes", int64(note.Off)+20)
	cut("truncated-tiny", "the dump cut to 10 bytes", 10)
	cut("empty", "an empty file", 0)
	return cs, nil
}
