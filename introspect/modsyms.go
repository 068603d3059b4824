package introspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"unicode"

	"github.com/hvpatch/hvpatch/symbols"
)

// Bounds on what a module's symbol table may claim: the guest controls
// every value read here.
const (
	// maxModuleSyms bounds num_symtab of one module (the largest Debian
	// modules have a few tens of thousands of symbols).
	maxModuleSyms = 1 << 18
	// maxModuleStrtab bounds the bytes of a module's string table read.
	maxModuleStrtab = 16 << 20
	// maxModuleExports bounds num_syms (exported symbols) of one module.
	maxModuleExports = 1 << 16
	// ksymNameLen is KSYM_NAME_LEN (512 since 6.1; 128 before): a name is
	// cut there, as /proc/kallsyms cuts it.
	ksymNameLen = 512
	// moduleStateUnformed is MODULE_STATE_UNFORMED: /proc/kallsyms skips
	// such a module (still being set up by the loader).
	moduleStateUnformed = 3
)

// elfSymSize is sizeof(Elf64_Sym): st_name u32, st_info u8, st_other u8,
// st_shndx u16, st_value u64, st_size u64.
const elfSymSize = 24

// ModuleSymbols returns the symbols of every loaded module the way
// /proc/kallsyms lists them (module_get_kallsym, s_show): for each module
// in list order its mod->kallsyms table (symtab, num_symtab, strtab,
// typetab; after init the core copy the loader kept), symbols with an
// empty name left out, the type letter from typetab in upper case when the
// module exports the symbol (a kernel_symbol of its own with that name and
// value) and lower case otherwise, Module set to the module's name. Offsets
// come from the guest's BTF; every count and size is bounded.
func (k *Kernel) ModuleSymbols() ([]symbols.Symbol, error) {
	if k.BTF == nil {
		return nil, ErrNoBTF
	}
	mods, err := k.Modules()
	if err != nil {
		return nil, err
	}
	var s fieldSpan
	ksymsF := s.need(k, "module.kallsyms", 8, 8)
	stateF := s.need(k, "module.state", 4, 4)
	expF := s.need(k, "module.syms", 8, 8)
	nexpF := s.need(k, "module.num_syms", 4, 4)
	if s.err != nil {
		return nil, fmt.Errorf("struct module layout: %w", s.err)
	}
	var ks fieldSpan
	symtabF := ks.need(k, "mod_kallsyms.symtab", 8, 8)
	numF := ks.need(k, "mod_kallsyms.num_symtab", 4, 4)
	strtabF := ks.need(k, "mod_kallsyms.strtab", 8, 8)
	typetabF := ks.need(k, "mod_kallsyms.typetab", 8, 8)
	if ks.err != nil {
		return nil, fmt.Errorf("struct mod_kallsyms layout: %w", ks.err)
	}
	if s.end > maxStructSpan || ks.end > maxStructSpan {
		return nil, fmt.Errorf("struct module layout: fields span %d bytes", max(s.end, ks.end))
	}
	prel32 := true // struct kernel_symbol with place-relative offsets (x86-64 since 4.19)
	ksymSize := uint64(12)
	if _, err := k.Field("kernel_symbol.value_offset"); err != nil {
		prel32, ksymSize = false, 16
		if _, err := k.Field("kernel_symbol.value"); err != nil {
			return nil, fmt.Errorf("struct kernel_symbol: neither value_offset nor value: %w", err)
		}
	}
	if sz, err := SizeOf(k.BTF, "kernel_symbol"); err == nil && sz >= ksymSize && sz <= 32 {
		ksymSize = sz
	}

	as := k.walkAS("module symbols")
	var out []symbols.Symbol
	mbuf := make([]byte, s.end)
	kbuf := make([]byte, ks.end)
	for _, m := range mods {
		if err := as.ReadVirt(m.Addr, mbuf); err != nil {
			return nil, fmt.Errorf("module %s: reading struct module at %#x: %w", m.Name, m.Addr, err)
		}
		if binary.LittleEndian.Uint32(mbuf[stateF.Offset:]) == moduleStateUnformed {
			continue
		}
		kallsyms := binary.LittleEndian.Uint64(mbuf[ksymsF.Offset:])
		if kallsyms == 0 {
			continue
		}
		if err := as.ReadVirt(kallsyms, kbuf); err != nil {
			return nil, fmt.Errorf("module %s: reading mod_kallsyms at %#x: %w", m.Name, kallsyms, err)
		}
		symtab := binary.LittleEndian.Uint64(kbuf[symtabF.Offset:])
		n := uint64(binary.LittleEndian.Uint32(kbuf[numF.Offset:]))
		strtab := binary.LittleEndian.Uint64(kbuf[strtabF.Offset:])
		typetab := binary.LittleEndian.Uint64(kbuf[typetabF.Offset:])
		if n == 0 {
			continue
		}
		if n > maxModuleSyms {
			return nil, fmt.Errorf("module %s: num_symtab %d, more than %d", m.Name, n, maxModuleSyms)
		}
		raw := make([]byte, n*elfSymSize)
		if err := as.ReadVirt(symtab, raw); err != nil {
			return nil, fmt.Errorf("module %s: reading %d symbols at %#x: %w", m.Name, n, symtab, err)
		}
		types := make([]byte, n)
		if err := as.ReadVirt(typetab, types); err != nil {
			return nil, fmt.Errorf("module %s: reading typetab at %#x: %w", m.Name, typetab, err)
		}
		var strEnd uint64
		for i := uint64(0); i < n; i++ {
			strEnd = max(strEnd, uint64(binary.LittleEndian.Uint32(raw[i*elfSymSize:]))+1)
		}
		strs, err := readUpTo(as, strtab, min(strEnd+ksymNameLen, maxModuleStrtab), strEnd)
		if err != nil {
			return nil, fmt.Errorf("module %s: strtab at %#x: %w", m.Name, strtab, err)
		}
		exported, err := k.moduleExports(as, m, mbuf, expF, nexpF, prel32, ksymSize)
		if err != nil {
			return nil, err
		}
		for i := uint64(0); i < n; i++ {
			e := raw[i*elfSymSize:]
			nameOff := uint64(binary.LittleEndian.Uint32(e))
			if nameOff >= uint64(len(strs)) {
				return nil, fmt.Errorf("module %s: symbol %d: name offset %#x past the string table", m.Name, i, nameOff)
			}
			nm := strs[nameOff:]
			end := bytes.IndexByte(nm, 0)
			if end < 0 {
				return nil, fmt.Errorf("module %s: symbol %d: name at strtab+%#x not terminated", m.Name, i, nameOff)
			}
			nm = nm[:min(end, ksymNameLen-1)]
			if len(nm) == 0 {
				continue
			}
			name := string(nm)
			value := binary.LittleEndian.Uint64(e[8:])
			typ := types[i]
			if exported[exportKey{name, value}] {
				typ = byte(unicode.ToUpper(rune(typ)))
			} else {
				typ = byte(unicode.ToLower(rune(typ)))
			}
			out = append(out, symbols.Symbol{Name: name, Addr: value, Type: typ, Module: m.Name})
		}
	}
	return out, nil
}

type exportKey struct {
	name  string
	value uint64
}

// moduleExports reads a module's own exported symbols (mod->syms,
// num_syms: what is_exported looks up for /proc/kallsyms).
func (k *Kernel) moduleExports(as *AddressSpace, m Module, mbuf []byte, expF, nexpF Field, prel32 bool, size uint64) (map[exportKey]bool, error) {
	out := map[exportKey]bool{}
	base := binary.LittleEndian.Uint64(mbuf[expF.Offset:])
	n := uint64(binary.LittleEndian.Uint32(mbuf[nexpF.Offset:]))
	if n == 0 || base == 0 {
		return out, nil
	}
	if n > maxModuleExports {
		return nil, fmt.Errorf("module %s: num_syms %d, more than %d", m.Name, n, maxModuleExports)
	}
	raw := make([]byte, n*size)
	if err := as.ReadVirt(base, raw); err != nil {
		return nil, fmt.Errorf("module %s: reading %d exported symbols at %#x: %w", m.Name, n, base, err)
	}
	for i := uint64(0); i < n; i++ {
		at := base + i*size
		e := raw[i*size:]
		var value, nameAddr uint64
		if prel32 {
			value = at + uint64(int64(int32(binary.LittleEndian.Uint32(e))))
			nameAddr = at + 4 + uint64(int64(int32(binary.LittleEndian.Uint32(e[4:]))))
		} else {
			value = binary.LittleEndian.Uint64(e)
			nameAddr = binary.LittleEndian.Uint64(e[8:])
		}
		got, err := readUpTo(as, nameAddr, ksymNameLen, 1)
		if err != nil {
			return nil, fmt.Errorf("module %s: export %d name at %#x: %w", m.Name, i, nameAddr, err)
		}
		nm := got
		if j := bytes.IndexByte(nm, 0); j >= 0 {
			nm = nm[:j]
		}
		out[exportKey{string(nm), value}] = true
	}
	return out, nil
}

// readUpTo reads up to n bytes at va, page by page, stopping at the first
// page that cannot be read; at least need bytes must come back.
func readUpTo(as *AddressSpace, va, n, need uint64) ([]byte, error) {
	buf := make([]byte, 0, n)
	for uint64(len(buf)) < n {
		cur := va + uint64(len(buf))
		chunk := min(n-uint64(len(buf)), 4096-cur%4096)
		p := make([]byte, chunk)
		if err := as.ReadVirt(cur, p); err != nil {
			if uint64(len(buf)) >= need {
				break
			}
			return nil, err
		}
		buf = append(buf, p...)
	}
	return buf, nil
}
