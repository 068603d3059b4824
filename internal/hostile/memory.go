package hostile

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// MemPlan is the memory cases planned against one guest memory.
type MemPlan struct {
	Kernel *introspect.Kernel
	Cases  []Case
}

// planner builds memory cases from one attached kernel.
type planner struct {
	k     *introspect.Kernel
	mem   hypervisor.PhysMem
	cases []Case
	notes []string
	img   []byte // [k.TextStart, k.TextEnd), holes zero
	maps  []introspect.Mapping
}

// PlanMemory attaches to the kernel in mem (a dump, or a paused live guest)
// and plans every memory case. Cases the kernel has no structure for are
// left out and named in the notes.
func PlanMemory(ctx context.Context, mem hypervisor.PhysMem, cpus []hypervisor.CPUState) (*MemPlan, []string, error) {
	k, err := introspect.Open(ctx, mem, cpus)
	if err != nil {
		return nil, nil, err
	}
	p := &planner{k: k, mem: mem}
	if p.maps, err = k.AS.Mappings(introspect.KernelImageStart, introspect.KernelImageEnd); err != nil {
		return nil, nil, err
	}
	if k.TextEnd <= k.TextStart || k.TextEnd-k.TextStart > 512<<20 {
		return nil, nil, fmt.Errorf("kernel image %#x-%#x", k.TextStart, k.TextEnd)
	}
	p.img = make([]byte, k.TextEnd-k.TextStart)
	for _, m := range p.maps {
		lo, hi := max(m.VA, k.TextStart), min(m.VA+m.Size, k.TextEnd)
		if lo < hi {
			mem.ReadPhys(m.GPA+(lo-m.VA), p.img[lo-k.TextStart:hi-k.TextStart])
		}
	}
	for _, f := range []func() error{p.btfCases, p.kallsymsCases, p.taskCases, p.moduleCases, p.bannerCases, p.pageTableCases, p.codeAreaCases} {
		if err := f(); err != nil {
			p.notes = append(p.notes, err.Error())
		}
	}
	return &MemPlan{Kernel: k, Cases: p.cases}, p.notes, nil
}

// virt turns a write of data at kernel virtual address va into physical
// edits, page by page.
func (p *planner) virt(va uint64, data []byte) ([]Edit, error) {
	var out []Edit
	for len(data) > 0 {
		t, err := p.k.AS.Translate(va)
		if err != nil {
			return nil, err
		}
		n := min(uint64(len(data)), t.PageSize-(va&(t.PageSize-1)), introspect.Size4K-(va&(introspect.Size4K-1)))
		out = append(out, Edit{t.GPA, bytes.Clone(data[:n])})
		va += n
		data = data[n:]
	}
	return out, nil
}

// add appends a case whose edits are virtual writes; a write that does not
// translate leaves the case out, with a note.
func (p *planner) add(name, what string, writes ...vwrite) *Case {
	c := Case{Name: name, What: what}
	for _, w := range writes {
		e, err := p.virt(w.va, w.data)
		if err != nil {
			p.notes = append(p.notes, fmt.Sprintf("%s: left out: %v", name, err))
			return nil
		}
		c.Mem = append(c.Mem, e...)
	}
	p.cases = append(p.cases, c)
	return &p.cases[len(p.cases)-1]
}

// addPhys appends a case of physical edits.
func (p *planner) addPhys(name, what string, edits ...Edit) *Case {
	p.cases = append(p.cases, Case{Name: name, What: what, Mem: edits})
	return &p.cases[len(p.cases)-1]
}

type vwrite struct {
	va   uint64
	data []byte
}

func (p *planner) sym(name string) (uint64, error) { return p.k.Symbols.Addr(name) }

// ---- BTF ----

type btfType struct {
	off   int // offset in raw
	kind  int
	vlen  int
	kflag bool
	name  string
}

const (
	btfInt, btfArray, btfStruct, btfUnion, btfEnum = 1, 3, 4, 5, 6
	btfTypedef, btfFuncProto, btfVar, btfDatasec   = 8, 13, 14, 15
	btfDeclTag, btfEnum64                          = 17, 19
)

type btfRaw struct {
	start uint64 // virtual address of raw[0]
	raw   []byte
	types []btfType // by id; 0 is void
}

func (p *planner) loadBTF() (*btfRaw, error) {
	start, err1 := p.sym("__start_BTF")
	stop, err2 := p.sym("__stop_BTF")
	if err1 != nil || err2 != nil || stop <= start || stop-start > 64<<20 {
		return nil, fmt.Errorf("btf cases: no BTF in this kernel")
	}
	raw := make([]byte, stop-start)
	if err := p.k.AS.ReadVirt(start, raw); err != nil {
		return nil, fmt.Errorf("btf cases: %w", err)
	}
	le := binary.LittleEndian
	if len(raw) < 24 || le.Uint16(raw) != 0xeb9f {
		return nil, fmt.Errorf("btf cases: no BTF magic")
	}
	hdr := int(le.Uint32(raw[4:]))
	toff, tlen := hdr+int(le.Uint32(raw[8:])), int(le.Uint32(raw[12:]))
	soff := hdr + int(le.Uint32(raw[16:]))
	str := func(o uint32) string {
		s := raw[soff+int(o):]
		if i := bytes.IndexByte(s, 0); i >= 0 {
			s = s[:i]
		}
		return string(s)
	}
	b := &btfRaw{start: start, raw: raw, types: []btfType{{}}}
	for off := toff; off+12 <= toff+tlen; {
		info := le.Uint32(raw[off+4:])
		t := btfType{off: off, kind: int(info>>24) & 0x1f, vlen: int(info & 0xffff), kflag: info>>31 != 0, name: str(le.Uint32(raw[off:]))}
		b.types = append(b.types, t)
		off += 12
		switch t.kind {
		case btfInt, btfVar, btfDeclTag:
			off += 4
		case btfArray:
			off += 12
		case btfStruct, btfUnion, btfDatasec, btfEnum64:
			off += 12 * t.vlen
		case btfEnum, btfFuncProto:
			off += 8 * t.vlen
		}
	}
	return b, nil
}

func (b *btfRaw) u32(off int) uint32 { return binary.LittleEndian.Uint32(b.raw[off:]) }

// structID is the id of the complete struct called name.
func (b *btfRaw) structID(name string) (int, error) {
	for id, t := range b.types {
		if t.kind == btfStruct && t.vlen > 0 && t.name == name {
			return id, nil
		}
	}
	return 0, fmt.Errorf("no struct %s in BTF", name)
}

// member is the raw offset of the member record called name of struct id.
func (b *btfRaw) member(id int, name string) (int, error) {
	t := b.types[id]
	for i := 0; i < t.vlen; i++ {
		m := t.off + 12 + 12*i
		if n := b.u32(m); n != 0 && b.nameAt(n) == name {
			return m, nil
		}
	}
	return 0, fmt.Errorf("struct %s has no member %s in BTF", t.name, name)
}

func (b *btfRaw) nameAt(o uint32) string {
	le := binary.LittleEndian
	hdr := int(le.Uint32(b.raw[4:]))
	soff := hdr + int(le.Uint32(b.raw[16:]))
	s := b.raw[soff+int(o):]
	if i := bytes.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	return string(s)
}

// w32 is a write of v at raw offset off.
func (b *btfRaw) w32(off int, v uint32) vwrite {
	return vwrite{b.start + uint64(off), le32(v)}
}

func (p *planner) btfCases() error {
	b, err := p.loadBTF()
	if err != nil {
		return err
	}
	task, err := b.structID("task_struct")
	if err != nil {
		return err
	}
	mod, err := b.structID("module")
	if err != nil {
		return err
	}
	tasks, err := b.member(task, "tasks")
	if err != nil {
		return err
	}
	modMem, memErr := b.member(mod, "mem")
	modList, err := b.member(mod, "list")
	if err != nil {
		return err
	}
	modName, err := b.member(mod, "name")
	if err != nil {
		return err
	}
	// An anonymous member whose type is the struct itself: looking up a
	// name the struct does not hold directly searched it forever.
	p.add("btf-anon-self-task_struct", "task_struct.tasks made an anonymous member of type task_struct (findMember recursed until the stack overflowed)",
		b.w32(tasks, 0), b.w32(tasks+4, uint32(task)))
	selfMem := modList
	if memErr == nil {
		selfMem = modMem
	}
	p.add("btf-anon-self-module", "struct module's "+b.nameAt(b.u32(selfMem))+" member made an anonymous member of type module (lsmod: unbounded recursion, fatal error: stack overflow)",
		b.w32(selfMem, 0), b.w32(selfMem+4, uint32(mod)))
	p.add("btf-anon-cycle", "task_struct.tasks an anonymous module, module.list an anonymous task_struct: a two-struct cycle of anonymous members",
		b.w32(tasks, 0), b.w32(tasks+4, uint32(mod)), b.w32(modList, 0), b.w32(modList+4, uint32(task)))
	if memErr == nil {
		arr := int(b.u32(modMem + 4))
		if arr > 0 && arr < len(b.types) && b.types[arr].kind == btfArray {
			p.add("btf-module-mem-nelems", "module.mem an array of 0xffffffff elements (lsmod allocated until hvpatchd died of out-of-memory)",
				b.w32(b.types[arr].off+12+8, 0xffffffff))
		} else {
			p.notes = append(p.notes, "btf-module-mem-nelems: module.mem is not a direct array")
		}
	} else {
		p.notes = append(p.notes, "btf-module-mem-nelems: this kernel's struct module has no mem[] (before 6.4)")
	}
	size := func(id int) int { return b.types[id].off + 8 }
	p.add("btf-task_struct-size-16", "task_struct of 16 bytes (ps: slice out of range)", b.w32(size(task), 16))
	p.add("btf-task_struct-size-huge", "task_struct of 0xfffffff0 bytes (ps: a 4 GiB allocation)", b.w32(size(task), 0xfffffff0))
	p.add("btf-module-size-16", "struct module of 16 bytes", b.w32(size(mod), 16))
	off := func(m int, kflag bool) vwrite {
		if kflag {
			return b.w32(m+8, 0x00fffff8)
		}
		return b.w32(m+8, 0xfffffff8)
	}
	p.add("btf-module-offsets-huge", "module.name and module.list at offsets far beyond the struct", off(modName, b.types[mod].kflag), off(modList, b.types[mod].kflag))
	if comm, err := b.member(task, "comm"); err == nil {
		if arr := int(b.u32(comm + 4)); arr > 0 && arr < len(b.types) && b.types[arr].kind == btfArray {
			p.add("btf-task-comm-nelems", "task_struct.comm an array of 0xffffffff chars", b.w32(b.types[arr].off+12+8, 0xffffffff))
		}
	}
	if pid, err := b.member(task, "pid"); err == nil {
		if td := int(b.u32(pid + 4)); td > 0 && td < len(b.types) && b.types[td].kind == btfTypedef {
			p.add("btf-typedef-self", "pid_t a typedef of itself (a type cycle without a struct)", b.w32(b.types[td].off+8, uint32(td)))
		}
		p.add("btf-dangling-type", "task_struct.pid of type id 0x7ffffff0 (no such type)", b.w32(pid+4, 0x7ffffff0))
	}
	p.add("btf-header-type-len-huge", "BTF header: type section of 0xfffffff0 bytes", b.w32(12, 0xfffffff0))
	p.add("btf-name-offset-huge", "task_struct's name at string offset 0x0ffffff0", b.w32(b.types[task].off, 0x0ffffff0))
	return nil
}

// ---- kallsyms ----

func (p *planner) kallsymsCases() error {
	tab, info, err := symbols.DecodeKallsymsInfo(p.img, p.k.TextStart)
	if err != nil {
		return fmt.Errorf("kallsyms cases: %w", err)
	}
	base := p.k.TextStart
	// Planted token tables: copies of the real token_table+token_index
	// below it in .rodata, each of which the decoder tries, and searches
	// 32 MiB back from, before it reaches the real one.
	block := p.img[info.TokenTableAddr-base : info.TokenIndexAddr-base+512]
	ro := rodataRun(p.maps)
	protect := [][2]uint64{{info.TokenTableAddr, info.TokenIndexAddr + 512}}
	lowK := info.TokenTableAddr
	for _, a := range []uint64{info.NumSymsAddr, info.NamesAddr, info.MarkersAddr, info.AddressesAddr, info.RelativeBaseAddr, info.SeqsOfNamesAddr} {
		if a != 0 {
			lowK = min(lowK, a)
		}
	}
	protect = append(protect, [2]uint64{lowK, info.TokenIndexAddr + 512})
	for _, r := range [][2]string{{"__start_BTF", "__stop_BTF"}, {"__start_notes", "__stop_notes"}, {"linux_banner", ""}, {"__start___ksymtab", "__stop___ksymtab_gpl"}} {
		a, err := p.sym(r[0])
		if err != nil {
			continue
		}
		e := a + 1024
		if r[1] != "" {
			if e2, err := p.sym(r[1]); err == nil && e2 > a {
				e = e2
			}
		}
		protect = append(protect, [2]uint64{a, e})
	}
	var plants []vwrite
	stride := (uint64(len(block)) + 4095) &^ 4095
	for slot := ro.VA; slot+stride <= min(ro.VA+ro.Size, info.TokenTableAddr) && len(plants) < 200; slot += stride {
		at := slot + info.TokenTableAddr%4096
		if at+uint64(len(block)) > slot+stride {
			at = slot + info.TokenTableAddr%8
		}
		clash := false
		for _, r := range protect {
			if at < r[1] && r[0] < at+uint64(len(block)) {
				clash = true
			}
		}
		if !clash {
			plants = append(plants, vwrite{at, block})
		}
	}
	if len(plants) < 20 {
		p.notes = append(p.notes, fmt.Sprintf("kallsyms-fake-token-tables: room for %d copies below the real table only", len(plants)))
	}
	if len(plants) > 0 {
		p.add("kallsyms-fake-token-tables", fmt.Sprintf("%d copies of the token table planted in .rodata below the real one (one attach took 398 s)", len(plants)), plants...)
	}
	// Markers zeroed: the tables no longer check out; the decoder falls
	// back to the whole image and must give up in bounded time.
	p.add("kallsyms-markers-zero", "kallsyms_markers zeroed (corrupt kallsyms)", vwrite{info.MarkersAddr, make([]byte, 256)})
	if info.NumSymsAddr != 0 {
		p.add("kallsyms-num-syms-huge", "kallsyms_num_syms 0x7fffffff", vwrite{info.NumSymsAddr, le32(0x7fffffff)})
	}
	p.aliasCase(tab, info)
	return nil
}

// aliasCase gives 85,000 consecutive kallsyms entries (or the longest run
// that spares the symbols hvpatch needs) the address of the first: read
// --disasm resolved each instruction through all of them (quadratic).
func (p *planner) aliasCase(tab *symbols.Table, info *symbols.KallsymsInfo) {
	const want = 85000
	all := tab.All()
	if len(all) != info.NumSyms {
		p.notes = append(p.notes, "kallsyms-85k-aliases: table and kallsyms counts differ")
		return
	}
	needed := map[string]bool{}
	// What hvpatch looks up by name (introspect, codearea, hvpatchd's
	// boot identity); every other symbol may move.
	for _, n := range []string{"_text", "_end", "linux_banner", "__start_BTF", "__stop_BTF", "init_task",
		"page_offset_base", "vmalloc_base", "vmemmap_base", "init_top_pgt", "level2_kernel_pgt", "modules", "runqueues",
		"__per_cpu_offset", "nr_cpu_ids", "system_state", "__start_notes", "__stop_notes"} {
		needed[n] = true
	}
	bestA, bestN := 0, 0
	start := 0
	for i := 0; i <= len(all); i++ {
		if i == len(all) || needed[all[i].Name] || strings.HasPrefix(all[i].Name, "kallsyms_") || all[i].Addr < p.k.TextStart {
			if i-start > bestN {
				bestA, bestN = start, i-start
			}
			start = i + 1
		}
	}
	n := min(bestN, want)
	if n < 1000 {
		p.notes = append(p.notes, "kallsyms-85k-aliases: no run of symbols to alias")
		return
	}
	a := bestA
	es := 4
	if info.Addressing == symbols.AddrAbsolute {
		es = info.PointerSize
	}
	at := info.AddressesAddr + uint64(a*es)
	run := bytes.Clone(p.img[at-p.k.TextStart : at-p.k.TextStart+uint64(n*es)])
	first := bytes.Clone(run[:es])
	for j := 1; j < n; j++ {
		if info.Addressing == symbols.AddrPlaceRelative {
			v := int32(binary.LittleEndian.Uint32(first)) - int32(4*j)
			binary.LittleEndian.PutUint32(run[j*4:], uint32(v))
		} else {
			copy(run[j*es:], first)
		}
	}
	// Check the result decodes as intended before offering it.
	img := bytes.Clone(p.img)
	copy(img[at-p.k.TextStart:], run)
	t2, err := symbols.DecodeKallsyms(img, p.k.TextStart)
	addr := all[a].Addr
	if err != nil {
		p.notes = append(p.notes, fmt.Sprintf("kallsyms-85k-aliases: the altered table does not decode: %v", err))
		return
	}
	same := 0
	for _, s := range t2.All() {
		if s.Addr == addr {
			same++
		}
	}
	if same < n {
		p.notes = append(p.notes, fmt.Sprintf("kallsyms-85k-aliases: %d symbols at %#x after the edit, wanted %d", same, addr, n))
		return
	}
	c := p.add("kallsyms-85k-aliases", fmt.Sprintf("%d symbols at one address %#x (read --disasm was quadratic)", same, addr), vwrite{at, run})
	if c != nil {
		c.Target = fmt.Sprintf("%#x", addr)
	}
}

// rodataRun is the largest run of contiguous read-only, non-executable
// mappings (where introspect looks for kallsyms first).
func rodataRun(maps []introspect.Mapping) introspect.Mapping {
	var best, cur introspect.Mapping
	for _, m := range maps {
		if m.Writable || !m.NX {
			cur = introspect.Mapping{}
			continue
		}
		if cur.Size > 0 && cur.VA+cur.Size == m.VA {
			cur.Size += m.Size
		} else {
			cur = introspect.Mapping{VA: m.VA, Size: m.Size}
		}
		if cur.Size > best.Size {
			best = cur
		}
	}
	return best
}

// ---- tasks, CPUs ----

// unmapped is a kernel address that does not translate.
func (p *planner) unmapped() uint64 {
	for _, va := range []uint64{0xffffc8ffff000000, 0xffffe8ffff000000, 0xfffffe7fff000000, 0xffff87ffff000000} {
		if _, err := p.k.AS.Translate(va); err != nil {
			return va
		}
	}
	return 0xffff800000000000
}

const listPoison = 0xdead000000000100

func (p *planner) taskCases() error {
	ts, err := p.k.Tasks()
	if err != nil {
		return fmt.Errorf("task cases: %w", err)
	}
	if len(ts) < 4 {
		return fmt.Errorf("task cases: only %d tasks", len(ts))
	}
	lo, err := p.k.Offset("task_struct.tasks")
	if err != nil {
		return err
	}
	comm, err := p.k.Offset("task_struct.comm")
	if err != nil {
		return err
	}
	parent, err := p.k.Offset("task_struct.real_parent")
	if err != nil {
		return err
	}
	t2 := ts[2].Addr + lo
	p.add("task-list-cycle", "the third task's tasks.next points back at the second task", vwrite{t2, le64(ts[1].Addr + lo)})
	p.add("task-list-self", "the third task's tasks.next points at itself", vwrite{t2, le64(t2)})
	p.add("task-list-poison", "the third task's tasks.next is LIST_POISON1", vwrite{t2, le64(listPoison)})
	p.add("task-list-unmapped", "the third task's tasks.next points at an unmapped kernel address", vwrite{t2, le64(p.unmapped())})
	p.add("task-list-direct-map-end", "the third task's tasks.next points just past the direct map of RAM (CR3-outside-RAM's kind for data)",
		vwrite{t2, le64(p.k.DirectMapBase + 1<<40)})
	last := ts[len(ts)-1]
	c := p.add("task-comm-inject", fmt.Sprintf("PID %d's comm holds a newline, a fake ps row and terminal escapes", last.PID),
		vwrite{last.Addr + comm, []byte("\nFAKEROW\x1b[2J\r\x00")})
	if c != nil {
		c.Markers = []string{"FAKEROW"}
	}
	p.add("task-parent-poison", fmt.Sprintf("PID %d's real_parent is LIST_POISON1", ts[3].PID), vwrite{ts[3].Addr + parent, le64(listPoison)})
	if a, err := p.sym("nr_cpu_ids"); err == nil {
		p.add("nr-cpu-ids-huge", "nr_cpu_ids 0xffffffff (idle-task walk)", vwrite{a, le32(0xffffffff)})
	}
	if a, err := p.sym("__per_cpu_offset"); err == nil {
		p.add("per-cpu-offset-bad", "__per_cpu_offset[1] points outside the kernel", vwrite{a + 8, le64(0x7fffffffff000000)})
	}
	return nil
}

// ---- modules ----

func (p *planner) moduleCases() error {
	mods, err := p.k.Modules()
	if err != nil {
		return fmt.Errorf("module cases: %w", err)
	}
	if len(mods) == 0 {
		return fmt.Errorf("module cases: no module loaded")
	}
	lo, err := p.k.Offset("module.list")
	if err != nil {
		return err
	}
	name, err := p.k.Offset("module.name")
	if err != nil {
		return err
	}
	m := mods[0]
	p.add("module-list-self", "the first module's list.next points at itself", vwrite{m.Addr + lo, le64(m.Addr + lo)})
	p.add("module-list-poison", "the first module's list.next is LIST_POISON1", vwrite{m.Addr + lo, le64(listPoison)})
	p.add("module-list-unmapped", "the first module's list.next points at an unmapped address", vwrite{m.Addr + lo, le64(p.unmapped())})
	c := p.add("module-name-inject", fmt.Sprintf("module %s renamed with a newline, a fake lsmod row and an OSC escape", m.Name),
		vwrite{m.Addr + name, []byte("\nFAKEMOD 1 2\x1b]0;pwned\x07\x00")})
	if c != nil {
		c.Markers = []string{"FAKEMOD"}
	}
	if off, err := p.k.Offset("module.mem[0].size"); err == nil {
		p.add("module-size-huge", "the first module's mem[0].size 0xffffffff", vwrite{m.Addr + off, le32(0xffffffff)})
	} else if off, err := p.k.Offset("module.core_layout.size"); err == nil {
		p.add("module-size-huge", "the first module's core_layout.size 0xffffffff", vwrite{m.Addr + off, le32(0xffffffff)})
	}
	return nil
}

// ---- banner ----

func (p *planner) bannerCases() error {
	a, err := p.sym("linux_banner")
	if err != nil {
		return err
	}
	b := make([]byte, 512)
	if err := p.k.AS.ReadVirt(a, b); err != nil {
		return err
	}
	if i := bytes.IndexByte(b, 0); i > 0 {
		b = b[:i]
	}
	const pre = "Linux version "
	if !bytes.HasPrefix(b, []byte(pre)) {
		return fmt.Errorf("banner cases: linux_banner %q", b)
	}
	relEnd := bytes.IndexByte(b[len(pre):], ' ')
	if relEnd < 4 {
		return fmt.Errorf("banner cases: linux_banner %q", b)
	}
	relEnd += len(pre)
	inj := []byte("\nRelease: FAKEREL\x1b[2J\nFAKEROW\r")
	at := relEnd + 2 // after " ("
	if at+len(inj) < len(b) {
		c := p.add("banner-inject", "linux_banner holds newlines, a fake Release: line and terminal escapes after the release", vwrite{a + uint64(at), inj})
		if c != nil {
			c.Markers = []string{"Release: FAKEREL", "FAKEREL", "FAKEROW"}
		}
	}
	p.add("release-escape", "the release in linux_banner ends in a terminal escape (\\S matches it)", vwrite{a + uint64(relEnd-4), []byte("\x1b[2J")})
	if a, err := p.sym("page_offset_base"); err == nil {
		p.add("page-offset-base-bad", "page_offset_base (the direct map) 0x1000", vwrite{a, le64(0x1000)})
	}
	return nil
}

// ---- page tables ----

// zeroPage finds an all-zero page of RAM in [lo, hi), from the top, that is
// not in the kernel image.
func (p *planner) zeroPage(lo, hi uint64, skip ...uint64) (uint64, error) {
	buf := make([]byte, introspect.Size4K)
	zero := make([]byte, introspect.Size4K)
	regs := p.mem.Regions()
	imgLo, imgHi := p.k.PhysBase, p.k.PhysBase+(p.k.TextEnd-p.k.TextStart)
	for i := len(regs) - 1; i >= 0; i-- {
		r := regs[i]
		for g := (min(r.End(), hi) - introspect.Size4K) &^ (introspect.Size4K - 1); g >= max(r.GPA, lo) && g < r.End(); g -= introspect.Size4K {
			if g >= imgLo && g < imgHi {
				continue
			}
			taken := false
			for _, s := range skip {
				taken = taken || s == g
			}
			if !taken && p.mem.ReadPhys(g, buf) == nil && bytes.Equal(buf, zero) {
				return g, nil
			}
			if g < introspect.Size4K {
				break
			}
		}
	}
	return 0, fmt.Errorf("no zero page in %#x-%#x", lo, hi)
}

func (p *planner) physU64(gpa uint64) uint64 {
	var b [8]byte
	p.mem.ReadPhys(gpa, b[:])
	return binary.LittleEndian.Uint64(b[:])
}

const (
	pteFlags = 0x63 // present, writable, accessed, dirty
	pteAddr  = 0x000ffffffffff000
	outside  = 0x7f00000000 // 508 GiB: beyond any test guest's RAM
)

func (p *planner) pageTableCases() error {
	if p.k.LA57 {
		return fmt.Errorf("page-table cases: 5-level paging not handled")
	}
	pml4 := p.k.CR3
	pud := p.physU64(pml4+511*8) & pteAddr
	pmd := p.physU64(pud+510*8) & pteAddr
	if pud == 0 || pmd == 0 {
		return fmt.Errorf("page-table cases: no kernel-image tables")
	}
	free := -1
	for i := 256; i < 511; i++ {
		if p.physU64(pml4+uint64(i)*8) == 0 {
			free = i
			break
		}
	}
	if free < 0 {
		return fmt.Errorf("page-table cases: no free PML4 entry in the kernel half")
	}
	pg, err := p.zeroPage(16<<20, ^uint64(0))
	if err != nil {
		return fmt.Errorf("page-table cases: %w", err)
	}
	self := make([]byte, introspect.Size4K)
	for i := 0; i < 512; i++ {
		binary.LittleEndian.PutUint64(self[i*8:], pg|pteFlags)
	}
	p.addPhys("pt-selfref-kernel-half", fmt.Sprintf("PML4 entry %d points at a page whose 512 entries all point at itself (the code-area scan collected leaves until out of memory)", free),
		Edit{pg, self}, Edit{pml4 + uint64(free)*8, le64(pg | pteFlags)})
	p.addPhys("pt-pud-loop", fmt.Sprintf("PML4 entry %d points at the PML4 itself (a cross-level cycle)", free),
		Edit{pml4 + uint64(free)*8, le64(pml4 | pteFlags)})
	p.addPhys("pt-table-outside-ram", fmt.Sprintf("PML4 entry %d points at a table beyond RAM", free),
		Edit{pml4 + uint64(free)*8, le64(outside | pteFlags)})
	lastSlot := (p.k.TextEnd - 1 - introspect.KernelImageStart) >> 21
	if lastSlot+3 < 512 && p.physU64(pmd+(lastSlot+3)*8) == 0 {
		p.addPhys("pt-pmd-selfref", "a free slot of level2_kernel_pgt points at level2_kernel_pgt itself",
			Edit{pmd + (lastSlot+3)*8, le64(pmd | pteFlags)})
	}
	e := p.physU64(pmd + lastSlot*8)
	if e&1 != 0 {
		p.addPhys("pt-image-leaf-outside-ram", "the last 2 MiB of the kernel image mapped beyond RAM",
			Edit{pmd + lastSlot*8, le64(e&^pteAddr | outside)})
	}
	if e := p.physU64(pml4 + 511*8); e&1 != 0 {
		p.addPhys("pt-kernel-pud-outside-ram", "the kernel-image PUD (PML4 entry 511) beyond RAM (CR3-outside-RAM's kind, one level down)",
			Edit{pml4 + 511*8, le64(e&^pteAddr | outside)})
	}
	return nil
}

// ---- code area ----

func (p *planner) codeAreaCases() error {
	pml4 := p.k.CR3
	pud := p.physU64(pml4+511*8) & pteAddr
	pmd := p.physU64(pud+510*8) & pteAddr
	var listed []uint64
	for i := uint64(0); i < 4; i++ {
		listed = append(listed, 0x80000+i*0x1000, 0x90000+i*0x1000)
	}
	hdr, err := p.zeroPage(0x1000, 0x100000, listed...)
	if err != nil {
		return fmt.Errorf("code-area cases: %w", err)
	}
	pt, err := p.zeroPage(0x1000, 0x100000, append(listed, hdr)...)
	if err != nil {
		return fmt.Errorf("code-area cases: %w", err)
	}
	slot := ((p.k.TextEnd-1-introspect.KernelImageStart)>>21 + 2)
	base := introspect.KernelImageStart + slot<<21
	var text, data []string
	for i := uint64(0); i < 4; i++ {
		text = append(text, fmt.Sprint(0x80000+i*0x1000))
		data = append(data, fmt.Sprint(0x90000+i*0x1000))
	}
	page := func(textList []string, entries string) []byte {
		js := fmt.Sprintf(`{"version":1,"kernel_text":%d,"base":%d,"pmd_entry":%d,"page_table":%d,"text":[%s],"data":[%s],"checks":[],"entries":[%s]}`,
			p.k.TextStart, base, pmd+slot*8, pt, strings.Join(textList, ","), strings.Join(data, ","), entries)
		b := make([]byte, introspect.Size4K)
		copy(b, "HVPAREA\x01")
		binary.LittleEndian.PutUint32(b[8:], uint32(len(js)))
		binary.LittleEndian.PutUint32(b[12:], crc32.ChecksumIEEE([]byte(js)))
		copy(b[16:], js)
		return b
	}
	// With the PMD entry and page table the header names, so that the
	// area is recovered as far as its entries.
	ptb := make([]byte, introspect.Size4K)
	for i := 0; i < 4; i++ {
		binary.LittleEndian.PutUint64(ptb[(0x80+i)*8:], uint64(0x80000+i*0x1000)|0x61)
		binary.LittleEndian.PutUint64(ptb[(0x90+i)*8:], uint64(0x90000+i*0x1000)|0x63|1<<63)
	}
	pmdE := Edit{pmd + slot*8, le64(pt | pteFlags)}
	if p.physU64(pmd+slot*8) != 0 {
		return fmt.Errorf("code-area cases: slot %d of the kernel-image PMD is in use", slot)
	}
	p.addPhys("codearea-header-huge-text-size", "a forged code-area header (area mapped to match) with an entry of text_size 2^62 in one page",
		Edit{hdr, page(text, `{"name":"forged","text_page":0,"text_pages":1,"data_page":0,"data_pages":1,"text_size":4611686018427387904,"data_size":0,"entry":0,"text_crc":0}`)},
		Edit{pt, ptb}, pmdE)
	p.addPhys("codearea-header-overflow-pages", "a forged code-area header whose entry's page index plus count overflows int",
		Edit{hdr, page(text, `{"name":"forged","text_page":1,"text_pages":9223372036854775807,"data_page":0,"data_pages":1,"text_size":4096,"data_size":0,"entry":0,"text_crc":0}`)},
		Edit{pt, ptb}, pmdE)
	var many []string
	for i := 0; i < 600; i++ {
		many = append(many, fmt.Sprint(0x1000))
	}
	p.addPhys("codearea-header-too-many-pages", "a forged code-area header listing 600 text pages (more than the first MiB holds)",
		Edit{hdr, page(many, "")}, Edit{pt, ptb}, pmdE)
	p.addPhys("codearea-header-escape-name", "a forged, consistent code-area header whose entry name holds a newline and escapes",
		Edit{hdr, page(text, fmt.Sprintf(`{"name":"\nFAKEROW\u001b[2J","text_page":0,"text_pages":1,"data_page":0,"data_pages":1,"text_size":16,"data_size":0,"entry":%d,"text_crc":0}`, base+0x80000))},
		Edit{pt, ptb}, pmdE)
	p.cases[len(p.cases)-1].Markers = []string{"FAKEROW"}
	p.cases[len(p.cases)-1].Target = fmt.Sprintf("%#x", base+0x80000) // read --disasm names it
	return nil
}
