package linker

// Kernel special sections: the tables the kernel itself processes at boot or
// module load to finish its code (jump labels, alternatives, BUG/WARN, fault
// fixups). Nothing in the guest processes them for a code area, so the
// linker does, at link time, with the guest's state supplied by the caller
// (Options.KeyEnabled, Options.CPUFeature). Layouts checked against the
// sources of Linux 6.1 (Debian 6.1.192) and 6.12 (Debian 6.12.117 headers):
//
//	struct jump_entry { s32 code; s32 target; long key; }            16 bytes, both
//	struct alt_instr (6.1)  { s32 instr, repl; u16 cpuid; u8 ilen, rlen; }  12 bytes
//	struct alt_instr (6.12) { s32 instr, repl; u32 ft_flags; u8 ilen, rlen; } 14 bytes
//	struct bug_entry { s32 bug_addr_disp; s32 file_disp; u16 line, flags; } 12 bytes, both
//	                 (GENERIC_BUG_RELATIVE_POINTERS + DEBUG_BUGVERBOSE)
//	struct exception_table_entry { int insn, fixup, data; }          12 bytes, both

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"strings"
)

// Section names the linker processes itself.
const (
	secJumpTable = "__jump_table"
	secAltInstr  = ".altinstructions"
	secBugTable  = "__bug_table"
	secExTable   = "__ex_table"
)

// processedSections are read by the linker and not placed.
var processedSections = map[string]bool{secJumpTable: true, secAltInstr: true, secBugTable: true, secExTable: true}

// Runtime constants (Linux 6.10+, asm/runtime-const.h): the immediate of a
// `mov $imm64, %reg` (runtime_ptr_SYM) or `shr $imm8, %reg`
// (runtime_shift_SYM) that the kernel writes at boot from the variable SYM.
const (
	secRuntimePtr   = "runtime_ptr_"
	secRuntimeShift = "runtime_shift_"
)

func isProcessed(name string) bool {
	return processedSections[name] || strings.HasPrefix(name, secRuntimePtr) || strings.HasPrefix(name, secRuntimeShift)
}

// placedAsText are executable sections with a kernel-special name that are
// ordinary code once linked: the replacement instructions of alternatives
// (copied over the original by the linker) and the slow paths that
// static_cpu_has() jumps to before alternatives are applied.
var placedAsText = map[string]bool{".altinstr_replacement": true, ".altinstr_aux": true}

// ignoredSpecial lists kernel sections a code area does without, by prefix.
var ignoredSpecial = []struct{ prefix, reason string }{
	{".static_call_sites", "static-call sites: the calls go to the __SCT__* trampolines (resolved from kallsyms), which the kernel keeps pointing at the current target; the sites are just not turned into direct calls"},
	{".return_sites", "objtool return-thunk list: returns are linked as the guest's own returns (Options.PlainReturns or the guest's thunk)"},
	{".retpoline_sites", "objtool retpoline list: calls to __x86_indirect_thunk_* resolve from kallsyms, and the kernel keeps those thunks correct for the mitigation it chose"},
	{".call_sites", "objtool call-depth list: calls from the code area are not depth-accounted (only matters with retbleed=stuff)"},
	{".ibt_endbr_seal", "objtool IBT seal list: the code area's endbr64 stay (not sealed); harmless"},
	{"__mcount_loc", "ftrace call-site list: code-area functions are not traceable (their fentry sites stay NOPs)"},
	{"__patchable_function_entries", "ftrace call-site list: code-area functions are not traceable (their fentry sites stay NOPs)"},
	{".orc_unwind_ip", "ORC unwind data: the guest's unwinder does not know the code area and falls back to frame pointers"},
	{".orc_unwind", "ORC unwind data: the guest's unwinder does not know the code area and falls back to frame pointers"},
	{".orc_header", "ORC unwind data: the guest's unwinder does not know the code area and falls back to frame pointers"},
	{".discard", "annotations the kernel's linker script discards"},
	{".smp_locks", "LOCK-prefix list: the kernel only strips LOCK prefixes on a uniprocessor boot; keeping them is always correct"},
}

// specialSection is a processed section: its bytes and its relocations by offset.
type specialSection struct {
	name   string
	data   []byte
	relocs map[uint64]reloc
}

// Alternative entry layouts.
const (
	AltLayoutAuto = 0  // tell them apart by size and relocation offsets
	AltLayout61   = 12 // Linux ≤ 6.2: u16 cpuid (bit 15 = NOT)
	AltLayout612  = 14 // Linux ≥ 6.3: u32 ft_flags (low 16 bits feature, high 16 bits flags)
)

// Alternative flags (6.12: high 16 bits of ft_flags; 6.1: bit 15 of cpuid).
const (
	altFlagNot        = 1 << 0
	altFlagDirectCall = 1 << 1
	altFlagInv61      = 1 << 15
)

// Bug flags (include/asm-generic/bug.h).
const bugFlagWarning = 1 << 0

// Nops are the kernel's x86-64 NOPs (x86_nops[], BYTES_NOP1..8), indexed by length.
var Nops = [][]byte{
	nil,
	{0x90},
	{0x66, 0x90},
	{0x0f, 0x1f, 0x00},
	{0x0f, 0x1f, 0x40, 0x00},
	{0x0f, 0x1f, 0x44, 0x00, 0x00},
	{0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00},
	{0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00},
	{0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00},
}

// fillNops fills b with the kernel's NOPs, longest first, as add_nops does.
func fillNops(b []byte) {
	for len(b) > 0 {
		n := min(len(b), len(Nops)-1)
		copy(b, Nops[n])
		b = b[n:]
	}
}

// SpecialError names one entry of a special section the linker cannot honour.
type SpecialError struct {
	Section string
	Site    string // function+offset the entry describes, or "" when unknown
	Reason  string
}

func (e *SpecialError) Error() string {
	if e.Site == "" {
		return fmt.Sprintf("%s: %s", e.Section, e.Reason)
	}
	return fmt.Sprintf("%s entry for %s: %s", e.Section, e.Site, e.Reason)
}

// where names a place in the object as function+offset (or section+offset).
func (o *Object) where(sec *section, off uint64) string {
	var best *symbol
	for i := range o.symbols {
		s := &o.symbols[i]
		if s.sec != sec || s.name == "" || s.typ == elf.STT_SECTION || s.typ == elf.STT_FILE || s.value > off {
			continue
		}
		if s.size != 0 && off >= s.value+s.size {
			continue
		}
		if best == nil || s.value > best.value || (s.value == best.value && s.typ == elf.STT_FUNC) {
			best = s
		}
	}
	if best == nil {
		return fmt.Sprintf("%s+%#x", sec.name, off)
	}
	return fmt.Sprintf("%s+%#x", best.name, off-best.value)
}

// place is a location in a placed section, from a self-relative table field.
type place struct {
	sec *section
	off uint64
}

// refAt returns the relocation of a table field and checks its type.
func (sp *specialSection) refAt(off uint64, types ...elf.R_X86_64) (reloc, error) {
	r, ok := sp.relocs[off]
	if !ok {
		return r, fmt.Errorf("no relocation for the field at offset %#x", off)
	}
	for _, t := range types {
		if r.typ == t {
			return r, nil
		}
	}
	return r, fmt.Errorf("field at offset %#x has a %v relocation, want %v", off, r.typ, types)
}

// placeOf resolves a `.long X - .` field to a location in a placed section.
func (o *Object) placeOf(sp *specialSection, off uint64) (place, error) {
	r, err := sp.refAt(off, elf.R_X86_64_PC32)
	if err != nil {
		return place{}, err
	}
	s := o.symbols[r.sym]
	if s.sec == nil {
		return place{}, fmt.Errorf("field at offset %#x refers to %s, which is not in a placed section", off, symbolLabel(s.name))
	}
	v := int64(s.value) + r.addend
	if v < 0 || uint64(v) > s.sec.size {
		return place{}, fmt.Errorf("field at offset %#x points outside %s (%#x)", off, s.sec.name, v)
	}
	return place{s.sec, uint64(v)}, nil
}

// checkSpecialSizes refuses tables whose size is not a whole number of
// entries of a known layout.
func (o *Object) checkSpecialSizes() []error {
	var errs []error
	for _, t := range []struct {
		name  string
		sizes []int
	}{{secJumpTable, []int{16}}, {secAltInstr, []int{AltLayout61, AltLayout612}}, {secBugTable, []int{12}}} {
		name, sizes := t.name, t.sizes
		sp := o.special[name]
		if sp == nil {
			continue
		}
		ok := false
		for _, n := range sizes {
			ok = ok || len(sp.data)%n == 0
		}
		if !ok {
			errs = append(errs, &SectionError{Section: name, Reason: fmt.Sprintf("size %d is not a whole number of entries (%v bytes each) of the layouts Linux 6.1/6.12 use", len(sp.data), sizes)})
		}
	}
	return errs
}

// checkExTable refuses every exception-table entry, naming its function.
func (o *Object) checkExTable(sp *specialSection) []error {
	const entSize = 12
	if len(sp.data)%entSize != 0 {
		return []error{&SectionError{Section: sp.name, Reason: fmt.Sprintf("size %d is not a multiple of %d (struct exception_table_entry)", len(sp.data), entSize)}}
	}
	var errs []error
	for i := 0; i < len(sp.data); i += entSize {
		site := fmt.Sprintf("entry %d", i/entSize)
		if p, err := o.placeOf(sp, uint64(i)); err == nil {
			site = o.where(p.sec, p.off)
		}
		errs = append(errs, &SectionError{Section: sp.name, Reason: fmt.Sprintf("user-memory access with fault fixup at %s: a fault there would oops because the guest's exception table does not cover the code area", site)})
	}
	return errs
}

// specialCtx is what the processing passes need of a link in progress.
type specialCtx struct {
	o       *Object
	img     *Image
	offs    map[*section]uint64
	addr    map[*section]uint64
	imports map[string]uint64
	opt     Options
	patched [][2]uint64 // guest address ranges rewritten by alternatives
}

// bytesOf is the image slice of a placed section.
func (c *specialCtx) bytesOf(s *section) []byte {
	buf := c.img.Data
	if s.area == areaText {
		buf = c.img.Text
	}
	return buf[c.offs[s] : c.offs[s]+s.size]
}

// symValue is S for a relocation's symbol at link time.
func (c *specialCtx) symValue(r reloc) uint64 {
	s := c.o.symbols[r.sym]
	switch {
	case s.sec != nil:
		return c.addr[s.sec] + s.value
	case s.shndx == elf.SHN_ABS:
		return s.value
	case s.shndx == elf.SHN_UNDEF:
		return c.imports[s.name]
	}
	return 0
}

func (c *specialCtx) process() []error {
	var errs []error
	// The kernel's order: alternatives first, then jump labels.
	if sp := c.o.special[secAltInstr]; sp != nil {
		errs = append(errs, c.alternatives(sp)...)
	}
	if sp := c.o.special[secJumpTable]; sp != nil {
		errs = append(errs, c.jumpLabels(sp)...)
	}
	if sp := c.o.special[secBugTable]; sp != nil {
		errs = append(errs, c.bugs(sp)...)
	}
	for _, name := range sortedSpecials(c.o.special) {
		if strings.HasPrefix(name, secRuntimePtr) || strings.HasPrefix(name, secRuntimeShift) {
			errs = append(errs, c.runtimeConsts(c.o.special[name])...)
		}
	}
	if len(c.patched) > 0 {
		for i := range c.img.Map.Relocations {
			r := &c.img.Map.Relocations[i]
			for _, p := range c.patched {
				if r.Addr >= p[0] && r.Addr < p[1] {
					r.Note = "overwritten: the alternative's replacement took this place"
				}
			}
		}
	}
	return errs
}

// jumpLabels sets every jump-label site as jump_label_type() would for the
// key's current state in the guest.
func (c *specialCtx) jumpLabels(sp *specialSection) []error {
	const entSize = 16
	m := &c.img.Map
	if len(sp.data)%entSize != 0 {
		return []error{&SectionError{Section: sp.name, Reason: fmt.Sprintf("size %d is not a multiple of %d (struct jump_entry)", len(sp.data), entSize)}}
	}
	var errs []error
	for i := uint64(0); i < uint64(len(sp.data)); i += entSize {
		fail := func(site, format string, a ...any) {
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf(format, a...)})
		}
		code, err := c.o.placeOf(sp, i)
		if err != nil {
			fail("", "entry %d: code: %v", i/entSize, err)
			continue
		}
		site := c.o.where(code.sec, code.off)
		target, err := c.o.placeOf(sp, i+4)
		if err != nil {
			fail(site, "target: %v", err)
			continue
		}
		kr, err := sp.refAt(i+8, elf.R_X86_64_PC64)
		if err != nil {
			fail(site, "key: %v", err)
			continue
		}
		if code.sec.area != areaText || target.sec.area != areaText {
			fail(site, "code or target is not in an executable section")
			continue
		}
		keyVal := c.symValue(kr) + uint64(kr.addend)
		keyAddr, branch := keyVal&^3, keyVal&1 != 0
		ksym := c.o.symbols[kr.sym]
		keyName := ksym.name
		if d := int64(keyAddr) - int64(c.symValue(kr)); d != 0 {
			keyName = fmt.Sprintf("%s%+d", keyName, d)
		}
		var enabled bool
		note := ""
		if ksym.sec != nil {
			// A key the object defines: not in the guest yet; its initial
			// state is in the object (struct static_key.enabled at offset 0).
			off := keyAddr - c.addr[ksym.sec]
			if !ksym.sec.nobits && off+4 <= uint64(len(ksym.sec.data)) {
				enabled = int32(binary.LittleEndian.Uint32(ksym.sec.data[off:])) > 0
			}
			note = "key defined by the object: its initial state"
		} else {
			if c.opt.KeyEnabled == nil {
				fail(site, "static key %s: Options.KeyEnabled is not set, so the key's state in the guest is unknown", keyName)
				continue
			}
			enabled, err = c.opt.KeyEnabled(keyAddr)
			if err != nil {
				fail(site, "static key %s at %#x: %v", keyName, keyAddr, err)
				continue
			}
		}
		buf := c.bytesOf(code.sec)[code.off:]
		size := 0
		switch {
		case len(buf) >= 2 && (buf[0] == 0xeb || bytes.HasPrefix(buf, Nops[2])):
			size = 2
		case len(buf) >= 5 && (buf[0] == 0xe9 || bytes.HasPrefix(buf, Nops[5])):
			size = 5
		default:
			fail(site, "jump-label site holds % x: neither a jmp nor a NOP of 2 or 5 bytes", buf[:min(5, len(buf))])
			continue
		}
		codeAddr := c.addr[code.sec] + code.off
		targetAddr := c.addr[target.sec] + target.off
		jump := enabled != branch // jump_label_type(): enabled ^ branch
		js := JumpLabelSite{Site: site, Addr: codeAddr, Size: size, Key: keyName, KeyAddr: keyAddr,
			Branch: branch, Enabled: enabled, Jump: jump, Target: targetAddr, Note: note}
		if jump {
			rel := int64(targetAddr) - int64(codeAddr) - int64(size)
			if size == 2 {
				if rel < math.MinInt8 || rel > math.MaxInt8 {
					fail(site, "target %#x is out of reach of the 2-byte site", targetAddr)
					continue
				}
				buf[0], buf[1] = 0xeb, byte(int8(rel))
			} else {
				if rel < math.MinInt32 || rel > math.MaxInt32 {
					fail(site, "target %#x is out of rel32 reach", targetAddr)
					continue
				}
				buf[0] = 0xe9
				binary.LittleEndian.PutUint32(buf[1:], uint32(int32(rel)))
			}
		} else {
			copy(buf, Nops[size])
		}
		m.JumpLabels = append(m.JumpLabels, js)
	}
	if len(m.JumpLabels) > 0 {
		m.Notes = append(m.Notes, fmt.Sprintf("%d jump-label site(s) set from the keys' state at link time; a later flip of those keys in the guest does not reach the code area (the kernel's jump tables do not list it)", len(m.JumpLabels)))
	}
	return errs
}

type altEntry struct {
	off               uint64 // in .altinstructions
	instr, repl       place
	feature           uint16
	flags             uint16
	not               bool
	instrlen, repllen int
}

// altLayout decides the entry size: explicit, or the one size whose
// relocation offsets (0 and 4 of every entry) match the section's.
func (c *specialCtx) altLayout(sp *specialSection) (int, error) {
	if c.opt.AltLayout != AltLayoutAuto {
		if c.opt.AltLayout != AltLayout61 && c.opt.AltLayout != AltLayout612 {
			return 0, fmt.Errorf("Options.AltLayout %d: want 0 (auto), 12 (6.1) or 14 (6.12)", c.opt.AltLayout)
		}
		if len(sp.data)%c.opt.AltLayout != 0 {
			return 0, fmt.Errorf("size %d is not a multiple of the %d-byte entry Options.AltLayout asks for", len(sp.data), c.opt.AltLayout)
		}
		return c.opt.AltLayout, nil
	}
	var fits []int
	for _, size := range []int{AltLayout61, AltLayout612} {
		if len(sp.data)%size != 0 {
			continue
		}
		ok := len(sp.relocs) == 2*len(sp.data)/size
		for off := 0; ok && off < len(sp.data); off += size {
			_, a := sp.relocs[uint64(off)]
			_, b := sp.relocs[uint64(off+4)]
			ok = a && b
		}
		if ok {
			fits = append(fits, size)
		}
	}
	if len(fits) != 1 {
		return 0, fmt.Errorf("size %d: cannot tell the 12-byte (6.1) from the 14-byte (6.12) entry layout; set Options.AltLayout", len(sp.data))
	}
	return fits[0], nil
}

// alternatives applies every alternative as apply_alternatives() would on
// a CPU with the guest's features.
func (c *specialCtx) alternatives(sp *specialSection) []error {
	m := &c.img.Map
	size, err := c.altLayout(sp)
	if err != nil {
		return []error{&SectionError{Section: sp.name, Reason: err.Error()}}
	}
	var entries []altEntry
	var errs []error
	for i := 0; i < len(sp.data); i += size {
		e := altEntry{off: uint64(i)}
		e.instr, err = c.o.placeOf(sp, uint64(i))
		if err != nil {
			errs = append(errs, &SpecialError{Section: sp.name, Reason: fmt.Sprintf("entry %d: original: %v", i/size, err)})
			continue
		}
		site := c.o.where(e.instr.sec, e.instr.off)
		e.repl, err = c.o.placeOf(sp, uint64(i+4))
		if err != nil {
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("replacement: %v", err)})
			continue
		}
		d := sp.data[i:]
		if size == AltLayout61 {
			cpuid := binary.LittleEndian.Uint16(d[8:])
			e.feature, e.not = cpuid&^altFlagInv61, cpuid&altFlagInv61 != 0
			e.instrlen, e.repllen = int(d[10]), int(d[11])
		} else {
			ft := binary.LittleEndian.Uint32(d[8:])
			e.feature, e.flags = uint16(ft), uint16(ft>>16)
			e.not = e.flags&altFlagNot != 0
			e.instrlen, e.repllen = int(d[12]), int(d[13])
		}
		switch {
		case e.flags&altFlagDirectCall != 0:
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("ALT_FLAG_DIRECT_CALL (feature %d): the kernel would read the call target from a paravirt pointer at patch time; not supported", e.feature)})
			continue
		case e.flags&^(altFlagNot|altFlagDirectCall) != 0:
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("unknown alternative flags %#x (feature %d)", e.flags, e.feature)})
			continue
		case e.instr.sec.area != areaText || e.repl.sec.area != areaText:
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: "original or replacement is not in an executable section"})
			continue
		case e.instr.off+uint64(e.instrlen) > e.instr.sec.size || e.repl.off+uint64(e.repllen) > e.repl.sec.size:
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: "original or replacement runs past the end of its section"})
			continue
		case e.repllen > e.instrlen:
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("replacement (%d bytes) is longer than the original (%d bytes)", e.repllen, e.instrlen)})
			continue
		}
		entries = append(entries, e)
	}
	if len(errs) > 0 {
		return errs
	}
	// Nested alternatives (6.10+ ALTERNATIVE_2) are consecutive entries for
	// one site: the kernel patches all of them over the longest length.
	for i := 0; i < len(entries); {
		j := i + 1
		for j < len(entries) && entries[j].instr == entries[i].instr {
			j++
		}
		n := 0
		for k := i; k < j; k++ {
			n = max(n, entries[k].instrlen)
		}
		for k := i; k < j; k++ {
			entries[k].instrlen = n
		}
		i = j
	}
	for _, e := range entries {
		site := c.o.where(e.instr.sec, e.instr.off)
		var has bool
		if c.opt.CPUFeature == nil {
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("alternative on CPU feature %d: Options.CPUFeature is not set, so the guest's features are unknown", e.feature)})
			continue
		}
		has, err = c.opt.CPUFeature(e.feature)
		if err != nil {
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("CPU feature %d: %v", e.feature, err)})
			continue
		}
		instrAddr := c.addr[e.instr.sec] + e.instr.off
		replAddr := c.addr[e.repl.sec] + e.repl.off
		dst := c.bytesOf(e.instr.sec)[e.instr.off : e.instr.off+uint64(e.instrlen)]
		as := AltSite{Site: site, Addr: instrAddr, Len: e.instrlen, Feature: e.feature, Not: e.not,
			FeatureSet: has, Applied: has != e.not, ReplAddr: replAddr, ReplLen: e.repllen}
		if !as.Applied {
			// optimize_nops(): a run of 1-byte NOPs becomes long NOPs. Only
			// done when the whole place is 0x90, where boundaries are certain.
			if bytes.Count(dst, []byte{0x90}) == len(dst) && len(dst) > 1 {
				fillNops(dst)
			}
			m.Alternatives = append(m.Alternatives, as)
			continue
		}
		buf := make([]byte, e.instrlen)
		copy(buf, c.bytesOf(e.repl.sec)[e.repl.off:e.repl.off+uint64(e.repllen)])
		if err := c.rerelativise(e, buf, int64(replAddr)-int64(instrAddr)); err != "" {
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: err})
			continue
		}
		fillNops(buf[e.repllen:])
		copy(dst, buf)
		c.patched = append(c.patched, [2]uint64{instrAddr, instrAddr + uint64(e.instrlen)})
		m.Alternatives = append(m.Alternatives, as)
	}
	return errs
}

// rerelativise moves the replacement's PC-relative fields (already linked
// for the replacement's own address) to the original's address, as the
// kernel's apply_relocation() does: targets outside the replacement keep
// their address.
func (c *specialCtx) rerelativise(e altEntry, buf []byte, delta int64) string {
	start, end := e.repl.off, e.repl.off+uint64(e.repllen)
	var rs []reloc
	for _, r := range c.o.relocs {
		if r.sec != e.repl.sec {
			continue
		}
		w := uint64(relocWidth[r.typ])
		if r.off+w <= start || r.off >= end {
			continue
		}
		if r.off < start || r.off+w > end {
			return fmt.Sprintf("a %v field at replacement offset %#x straddles the end of the replacement", r.typ, int64(r.off-start))
		}
		rs = append(rs, r)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].off < rs[j].off })
	for _, r := range rs {
		at := r.off - start
		sym := c.o.symbols[r.sym]
		switch r.typ {
		case elf.R_X86_64_64, elf.R_X86_64_32, elf.R_X86_64_32S:
			continue // absolute: the same wherever it runs
		case elf.R_X86_64_PC32, elf.R_X86_64_PLT32:
			if c.opt.PlainReturns && sym.shndx == elf.SHN_UNDEF && sym.name == ReturnThunk {
				continue // already `ret; int3...`: nothing relative left
			}
			if sym.sec == e.repl.sec {
				return fmt.Sprintf("rel32 at replacement offset %#x refers into %s itself; cannot tell whether it stays inside this replacement", at, sym.sec.name)
			}
			v := int64(int32(binary.LittleEndian.Uint32(buf[at:]))) + delta
			if v < math.MinInt32 || v > math.MaxInt32 {
				return fmt.Sprintf("rel32 at replacement offset %#x (to %s) is out of reach from the original's place", at, symbolLabel(sym.name))
			}
			binary.LittleEndian.PutUint32(buf[at:], uint32(int32(v)))
		case elf.R_X86_64_PC64:
			v := int64(binary.LittleEndian.Uint64(buf[at:])) + delta
			binary.LittleEndian.PutUint64(buf[at:], uint64(v))
		default:
			return fmt.Sprintf("%v relocation at replacement offset %#x", r.typ, at)
		}
	}
	return ""
}

// bugs silences WARNs (ud2 → 2-byte NOP) and keeps BUGs' ud2.
func (c *specialCtx) bugs(sp *specialSection) []error {
	const entSize = 12
	m := &c.img.Map
	if len(sp.data)%entSize != 0 {
		return []error{&SectionError{Section: sp.name, Reason: fmt.Sprintf("size %d is not a multiple of %d (struct bug_entry with relative pointers and DEBUG_BUGVERBOSE)", len(sp.data), entSize)}}
	}
	var errs []error
	for i := uint64(0); i < uint64(len(sp.data)); i += entSize {
		p, err := c.o.placeOf(sp, i)
		if err != nil {
			errs = append(errs, &SpecialError{Section: sp.name, Reason: fmt.Sprintf("entry %d: %v", i/entSize, err)})
			continue
		}
		site := c.o.where(p.sec, p.off)
		line := binary.LittleEndian.Uint16(sp.data[i+8:])
		flags := binary.LittleEndian.Uint16(sp.data[i+10:])
		file := ""
		if fp, err := c.o.placeOf(sp, i+4); err == nil && !fp.sec.nobits {
			if s := fp.sec.data[fp.off:]; bytes.IndexByte(s, 0) >= 0 {
				file = string(s[:bytes.IndexByte(s, 0)])
			}
		}
		buf := c.bytesOf(p.sec)[p.off:]
		if p.sec.area != areaText || len(buf) < 2 || buf[0] != 0x0f || buf[1] != 0x0b {
			errs = append(errs, &SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf("bug site does not hold ud2 (0f 0b) but % x", buf[:min(2, len(buf))])})
			continue
		}
		bs := BugSite{Site: site, Addr: c.addr[p.sec] + p.off, File: file, Line: int(line), Flags: flags, Warn: flags&bugFlagWarning != 0}
		if bs.Warn {
			copy(buf, Nops[2])
			m.Notes = append(m.Notes, fmt.Sprintf("WARN at %s (%s) silenced: the guest cannot report it", site, bs.fileLine()))
		} else {
			m.Notes = append(m.Notes, fmt.Sprintf("BUG at %s (%s) keeps its ud2: the guest reports it as an invalid-opcode oops, not as this BUG", site, bs.fileLine()))
		}
		m.Bugs = append(m.Bugs, bs)
	}
	return errs
}

func (b BugSite) fileLine() string {
	if b.File == "" {
		return fmt.Sprintf("line %d", b.Line)
	}
	f := b.File
	if i := strings.LastIndexByte(f, '/'); i >= 0 {
		f = f[i+1:]
	}
	return fmt.Sprintf("%s:%d", f, b.Line)
}

func sortedSpecials(m map[string]*specialSection) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// runtimeConsts writes each runtime constant's immediate with the value the
// guest's kernel wrote into its own copies at boot: the variable's current
// value, read from guest memory (8 bytes for a pointer, the low byte of a
// 32-bit shift count).
func (c *specialCtx) runtimeConsts(sp *specialSection) []error {
	ptr := strings.HasPrefix(sp.name, secRuntimePtr)
	sym := strings.TrimPrefix(strings.TrimPrefix(sp.name, secRuntimePtr), secRuntimeShift)
	fail := func(site, format string, a ...any) []error {
		return []error{&SpecialError{Section: sp.name, Site: site, Reason: fmt.Sprintf(format, a...)}}
	}
	if len(sp.data)%4 != 0 {
		return fail("", "size %d is not a multiple of 4", len(sp.data))
	}
	if c.opt.ReadGuest == nil || c.opt.Resolve == nil {
		return fail("", "runtime constant %s: the linker needs the guest's value (Options.ReadGuest and Options.Resolve)", sym)
	}
	addr, ok := c.opt.Resolve(sym)
	if !ok {
		return fail("", "runtime constant %s: the guest's kallsyms has no such variable", sym)
	}
	var raw [8]byte
	width := 8
	if !ptr {
		width = 4
	}
	if err := c.opt.ReadGuest(addr, raw[:width]); err != nil {
		return fail("", "runtime constant %s: reading it at %#x: %v", sym, addr, err)
	}
	val := binary.LittleEndian.Uint64(raw[:])
	var errs []error
	for i := uint64(0); i < uint64(len(sp.data)); i += 4 {
		p, err := c.o.placeOf(sp, i)
		if err != nil {
			errs = append(errs, fail("", "entry %d: %v", i/4, err)...)
			continue
		}
		site := c.o.where(p.sec, p.off)
		b := c.bytesOf(p.sec)
		switch {
		case ptr && p.off+8 <= uint64(len(b)):
			binary.LittleEndian.PutUint64(b[p.off:], val)
		case !ptr && p.off < uint64(len(b)):
			if val > 63 {
				errs = append(errs, fail(site, "shift count %d of %s is not a shift", val, sym)...)
				continue
			}
			b[p.off] = byte(val)
		default:
			errs = append(errs, fail(site, "the immediate lies outside its section")...)
			continue
		}
		c.img.Map.Notes = append(c.img.Map.Notes, fmt.Sprintf("runtime constant %s at %s set to %#x from the guest", sym, site, val))
	}
	return errs
}
