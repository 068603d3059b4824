// Package objdiff compares compiled kernel objects with each other and with
// the code a guest runs, and cuts the changed functions out of an object.
//
// It is the middle of `hvpatch build`: ksource compiles a .c file before and
// after a fix; objdiff checks that the unpatched object is the guest's code
// (Verify), finds which functions the fix really changes (Diff) and writes a
// small relocatable object with just those functions, every other reference
// turned into a kallsyms name the linker resolves in the guest (Extract).
// The same checks that kpatch's create-diff-object makes on a whole-kernel
// build are made here against guest memory, so no vmlinux or debug package
// is needed.
package objdiff

import (
	"debug/elf"
	"strings"

	"github.com/hvpatch/hvpatch/kobj"
)

// special describes a kernel section made of fixed-size entries whose first
// field points at code: the kernel (or objtool, or ftrace) acts on the code
// through them.
type special struct {
	name string
	// size gives the entry size, or 0 when it must be found from the
	// relocation pattern (layouts differ between kernel versions).
	size uint64
	// sizes lists the candidate sizes when size is 0.
	sizes []uint64
	// keep: the entries go into the extracted object for the linker to act
	// on; otherwise they are dropped with note.
	keep bool
	// patched: the guest rewrote the code at each entry at boot, so Verify
	// masks entryLen bytes at the site (0: the length byte in the entry).
	patched bool
	siteLen int
	note    string
}

// specials lists the kernel sections objdiff knows. The layouts are those of
// struct jump_entry, alt_instr, bug_entry, exception_table_entry,
// static_call_site and paravirt_patch_site (6.1 and 6.12, x86-64).
var specials = []special{
	{name: "__jump_table", size: 16, keep: true, patched: true, siteLen: 5},
	{name: ".altinstructions", sizes: []uint64{12, 14}, keep: true, patched: true},
	{name: "__bug_table", size: 12, keep: true},
	{name: "__ex_table", size: 12, keep: true},
	{name: ".static_call_sites", size: 8, keep: true, patched: true, siteLen: 5},
	{name: ".parainstructions", size: 16, patched: true,
		note: "paravirt call sites stay indirect calls through pv_ops (correct, a few cycles slower)"},
	{name: ".smp_locks", size: 4, patched: true, siteLen: 1,
		note: "lock prefixes are kept (correct on any CPU count)"},
	{name: ".retpoline_sites", size: 4, note: "retpoline thunk calls are linked to the guest's thunks"},
	{name: ".return_sites", size: 4, note: "returns are linked as the guest returns (ret or its return thunk)"},
	{name: ".call_sites", size: 4, note: "call-depth tracking sites are not needed in the code area"},
	{name: ".ibt_endbr_seal", size: 4, patched: true, siteLen: 4, note: "sealing of unused endbr64 is not needed in the code area"},
	{name: "__mcount_loc", size: 8, note: "the fentry call of new code is a NOP; ftrace does not know the code area"},
	{name: "__patchable_function_entries", size: 8, note: "the fentry call of new code is a NOP; ftrace does not know the code area"},
	{name: ".orc_unwind_ip", size: 4, note: "ORC unwind data is not registered for the code area (stack traces through it are unreliable)"},
	{name: ".orc_unwind", size: 6, note: "ORC unwind data is not registered for the code area"},
}

// Runtime constants (6.10+, arch/x86/include/asm/runtime-const.h): a
// `mov $imm64` or `shr $imm8` whose immediate the kernel writes at boot
// from a variable (USER_PTR_MAX, the dentry hash); each
// runtime_ptr_SYM / runtime_shift_SYM section lists the immediates.
var (
	runtimePtr   = special{name: "runtime_ptr_", size: 4, keep: true, patched: true, siteLen: 8}
	runtimeShift = special{name: "runtime_shift_", size: 4, keep: true, patched: true, siteLen: 1}
)

func specialOf(name string) *special {
	for i := range specials {
		if specials[i].name == name {
			return &specials[i]
		}
	}
	switch {
	case strings.HasPrefix(name, runtimePtr.name):
		return &runtimePtr
	case strings.HasPrefix(name, runtimeShift.name):
		return &runtimeShift
	}
	return nil
}

// ignoredSection reports sections that never go into extracted code: debug
// information, notes, discard sections and the like.
func ignoredSection(s *kobj.Section) bool {
	switch {
	case strings.HasPrefix(s.Name, ".discard"), strings.HasPrefix(s.Name, ".debug"), strings.HasPrefix(s.Name, ".note"),
		s.Name == ".comment", strings.HasPrefix(s.Name, ".BTF"), s.Name == ".eh_frame", strings.HasPrefix(s.Name, ".gnu"),
		s.Name == ".modinfo", strings.HasPrefix(s.Name, "__ksymtab"), strings.HasPrefix(s.Name, "__kcrctab"),
		strings.HasPrefix(s.Name, ".export_symbol"):
		return true
	}
	return s.Flags&elf.SHF_ALLOC == 0
}

// isText reports executable sections.
func isText(s *kobj.Section) bool { return s.Flags&elf.SHF_EXECINSTR != 0 }

// initSection reports code and data the kernel frees or never keeps after
// boot: it cannot be compared with guest memory, and changing it has no
// effect on a running kernel.
func initSection(name string) bool {
	for _, p := range []string{".init.", ".exit.", ".head.text", ".meminit.", ".cpuinit.", ".devinit."} {
		if strings.HasPrefix(name, p) || name == strings.TrimSuffix(p, ".") {
			return true
		}
	}
	return false
}

// entrySize finds the entry size of a special section: the given size, or
// the candidate whose multiples every relocation offset pattern fits.
func entrySize(sp *special, s *kobj.Section) (uint64, bool) {
	if sp.size != 0 {
		return sp.size, s.Size%sp.size == 0
	}
	for _, size := range sp.sizes {
		if s.Size%size != 0 || s.Size == 0 {
			continue
		}
		ok := true
		first := map[uint64]bool{}
		for _, r := range s.Relocs {
			if r.Offset%size >= 8 { // relocated fields are the first two s32s
				ok = false
				break
			}
			if r.Offset%size == 0 {
				first[r.Offset/size] = true
			}
		}
		if ok && uint64(len(first)) == s.Size/size {
			return size, true
		}
	}
	return 0, false
}

// siteReloc returns the relocation of entry i's first field (the code it
// describes), or nil.
func siteReloc(s *kobj.Section, size uint64, i uint64) *kobj.Reloc {
	for _, r := range s.Relocs {
		if r.Offset == i*size {
			return r
		}
	}
	return nil
}

// codeTarget resolves where a relocation points inside the object: the
// section and offset, for PC-relative fields as "the place the field
// describes" (S + A + 4 for a 32-bit field at the end of its instruction or
// entry; the kernel's relative entries are written as S + A - P at P, so the
// target is S + A when P is the entry field itself).
func codeTarget(r *kobj.Reloc, pcRelEntry bool) (*kobj.Section, int64) {
	if r.Sym == nil || r.Sym.Section == nil {
		return nil, 0
	}
	off := int64(r.Sym.Value) + r.Addend
	if !pcRelEntry && (r.Type == elf.R_X86_64_PC32 || r.Type == elf.R_X86_64_PLT32) {
		off += 4
	}
	return r.Sym.Section, off
}
