package symbols

import (
	"debug/elf"
	"errors"
	"fmt"
)

// LoadVmlinux reads the symbols of a kernel ELF from its .symtab and moves
// them by slide (the KASLR offset: running _text minus the file's _text).
// Absolute symbols and those of a zero-based per-CPU section (x86-64's
// .data..percpu) are not moved, as KASLR does not move them. Type letters
// follow nm. Distribution kernels ship stripped: that is an error that says
// so, and DecodeKallsyms on VmlinuxImage is the way to go then.
func LoadVmlinux(path string, slide uint64) (*Table, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("symbols: vmlinux %s: %w", path, err)
	}
	defer f.Close()
	esyms, err := f.Symbols()
	if errors.Is(err, elf.ErrNoSymbols) {
		return nil, fmt.Errorf("symbols: vmlinux %s has no .symtab (stripped, as distribution kernels are); decode its kallsyms instead (VmlinuxImage + DecodeKallsyms) or use the -dbg package's vmlinux", path)
	}
	if err != nil {
		return nil, fmt.Errorf("symbols: vmlinux %s: %w", path, err)
	}
	syms := make([]Symbol, 0, len(esyms))
	for _, es := range esyms {
		typ, slid, ok := nmType(f, es)
		if !ok {
			continue
		}
		a := es.Value
		if slid {
			a += slide
		}
		syms = append(syms, Symbol{Name: es.Name, Addr: a, Type: typ})
	}
	if len(syms) == 0 {
		return nil, fmt.Errorf("symbols: vmlinux %s: .symtab holds no defined symbols", path)
	}
	return newTableOwned(syms), nil
}

// nmType gives the letter nm prints for es, whether KASLR moves it, and
// false for entries that are no symbol of the image (undefined, section and
// file symbols).
func nmType(f *elf.File, es elf.Symbol) (typ byte, slid, ok bool) {
	st := elf.ST_TYPE(es.Info)
	if st == elf.STT_SECTION || st == elf.STT_FILE {
		return 0, false, false
	}
	bind := elf.ST_BIND(es.Info)
	switch es.Section {
	case elf.SHN_UNDEF:
		return 0, false, false
	case elf.SHN_ABS:
		return upperIf('a', bind != elf.STB_LOCAL), false, true
	case elf.SHN_COMMON:
		return 'C', false, true
	}
	if int(es.Section) >= len(f.Sections) {
		return 0, false, false
	}
	sec := f.Sections[es.Section]
	// The linker may attach a symbol outside any section (such as _end)
	// to a neighbouring one: only values inside the zero-based per-CPU
	// section are per-CPU offsets.
	perCPU := f.Type != elf.ET_REL && sec.Addr == 0 && sec.Name == ".data..percpu" && es.Value <= sec.Size
	slid = !perCPU
	if bind == elf.STB_WEAK {
		if st == elf.STT_OBJECT {
			return 'V', slid, true
		}
		return 'W', slid, true
	}
	switch {
	case sec.Flags&elf.SHF_EXECINSTR != 0:
		typ = 't'
	case sec.Flags&elf.SHF_ALLOC == 0:
		typ = 'n'
	case sec.Type == elf.SHT_NOBITS:
		typ = 'b'
	case sec.Flags&elf.SHF_WRITE != 0:
		typ = 'd'
	default:
		typ = 'r'
	}
	return upperIf(typ, bind != elf.STB_LOCAL), slid, true
}

func upperIf(c byte, upper bool) byte {
	if upper {
		return c - 'a' + 'A'
	}
	return c
}

// VmlinuxImage lays out the loadable segments of a kernel ELF as they sit
// in memory from _text, so DecodeKallsyms can read a stripped vmlinux. The
// per-CPU segment, linked at virtual address 0 on x86-64, is not part of
// the image and is left out.
func VmlinuxImage(path string) (img []byte, base uint64, err error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("symbols: vmlinux %s: %w", path, err)
	}
	defer f.Close()
	var loads []*elf.Prog
	lo, hi := ^uint64(0), uint64(0)
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD || p.Vaddr == 0 {
			continue
		}
		loads = append(loads, p)
		lo = min(lo, p.Vaddr)
		hi = max(hi, p.Vaddr+p.Memsz)
	}
	if len(loads) == 0 {
		return nil, 0, fmt.Errorf("symbols: vmlinux %s has no loadable segment", path)
	}
	if hi-lo > 1<<30 {
		return nil, 0, fmt.Errorf("symbols: vmlinux %s: segments span %#x..%#x, more than 1 GiB: not a kernel image", path, lo, hi)
	}
	img = make([]byte, hi-lo)
	for _, p := range loads {
		if p.Filesz > p.Memsz {
			return nil, 0, fmt.Errorf("symbols: vmlinux %s: segment at %#x has file size %#x above memory size %#x", path, p.Vaddr, p.Filesz, p.Memsz)
		}
		dst := img[p.Vaddr-lo : p.Vaddr-lo+p.Filesz]
		if _, err := p.ReadAt(dst, 0); err != nil {
			return nil, 0, fmt.Errorf("symbols: vmlinux %s: segment at %#x: %w", path, p.Vaddr, err)
		}
	}
	return img, lo, nil
}
