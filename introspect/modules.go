package introspect

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf/btf"
)

// Module is one loaded kernel module, as /proc/modules shows it.
type Module struct {
	Name string
	Base uint64 // start of its core text
	Size uint64 // total size, init parts included while they exist
	Addr uint64 // address of its struct module
	// State is mod->state: ModuleLive, ModuleComing, ModuleGoing or
	// ModuleUnformed.
	State uint32
	// Settled: the module is live and its init is over as far as its
	// symbols go (mod->kallsyms points at its core copy, which
	// do_init_module switches to after the init, before the init copy is
	// freed). Kernels without that field settle with the live state.
	Settled bool
}

// Module states (enum module_state, the same values since 3.x).
const (
	ModuleLive     = 0 // initialised: its code is final and its init done
	ModuleComing   = 1 // running its init
	ModuleGoing    = 2 // being unloaded
	ModuleUnformed = 3 // still being set up by the loader
)

// Modules walks the kernel's module list. Base and Size follow
// /proc/modules: since 6.4 they come from mod->mem[] (MOD_TEXT first),
// before that from core_layout and init_layout.
func (k *Kernel) Modules() ([]Module, error) {
	head, err := k.Symbols.Addr("modules")
	if err != nil {
		return nil, err
	}
	var s fieldSpan
	listOff := s.need(k, "module.list", 8, 0).Offset
	name := s.need(k, "module.name", 1, 0)
	// mod->state (a BTF without it: every module counts as live).
	stateOff, haveState := uint64(0), false
	if f, err := k.Field("module.state"); err == nil && f.Size == 4 {
		stateOff, haveState = f.Offset, true
		s.end = maxU(s.end, f.Offset+4)
	}
	// mod->kallsyms and &mod->core_kallsyms (CONFIG_KALLSYMS).
	ksymsOff, coreOff, haveKsyms := uint64(0), uint64(0), false
	if f, err := k.Field("module.kallsyms"); err == nil && f.Size == 8 {
		if c, err := k.Field("module.core_kallsyms"); err == nil {
			ksymsOff, coreOff, haveKsyms = f.Offset, c.Offset, true
			s.end = maxU(s.end, f.Offset+8)
		}
	}
	if s.err != nil {
		return nil, s.err
	}
	// MODULE_NAME_LEN is 56 (64 - sizeof(unsigned long)).
	nameSize := min(name.Size, 64)
	s.end = maxU(s.end, name.Offset+nameSize)
	// The base is the first part's; the sizes of all parts are summed
	// (init parts are zero once the module finished loading).
	var baseOff uint64
	var sizes []Field
	if mem, err := k.Field("module.mem"); err == nil {
		arr, ok := btf.UnderlyingType(mem.Type).(*btf.Array)
		if !ok {
			return nil, fmt.Errorf("module.mem is not an array")
		}
		// MOD_MEM_NUM_TYPES is 7; a guest's BTF may claim 2^32.
		if arr.Nelems == 0 || arr.Nelems > maxModMem {
			return nil, fmt.Errorf("module.mem has %d elements, a kernel has 1..%d", arr.Nelems, maxModMem)
		}
		for i := 0; i < int(arr.Nelems); i++ {
			sizes = append(sizes, s.need(k, fmt.Sprintf("module.mem[%d].size", i), 4, 8))
		}
		baseOff = s.need(k, "module.mem[0].base", 8, 8).Offset
	} else {
		if _, err := k.Field("module.core_layout.base"); err != nil {
			return nil, fmt.Errorf("struct module has neither mem[] nor core_layout: %w", err)
		}
		baseOff = s.need(k, "module.core_layout.base", 8, 8).Offset
		for _, p := range []string{"module.core_layout.size", "module.init_layout.size"} {
			sizes = append(sizes, s.need(k, p, 4, 8))
		}
	}
	if s.err != nil {
		return nil, fmt.Errorf("struct module layout: %w", s.err)
	}
	for _, f := range sizes {
		s.end = maxU(s.end, f.Offset+f.Size)
	}
	if s.end > maxStructSpan {
		return nil, fmt.Errorf("struct module layout: the fields read span %d bytes, more than the %d any kernel's struct module has", s.end, maxStructSpan)
	}

	as := k.walkAS("module walk")
	buf := make([]byte, s.end)
	var out []Module
	seen := map[uint64]bool{}
	next, err := as.ReadUint64(head)
	if err != nil {
		return nil, fmt.Errorf("reading the module list head at %#x: %w", head, err)
	}
	for next != head {
		addr := next - listOff
		if seen[addr] {
			return nil, fmt.Errorf("module list loops at %#x", addr)
		}
		if len(out) >= maxListLength {
			return nil, fmt.Errorf("module list longer than %d entries", maxListLength)
		}
		seen[addr] = true
		if err := as.ReadVirt(addr, buf); err != nil {
			return nil, fmt.Errorf("reading struct module at %#x: %w", addr, err)
		}
		nm := buf[name.Offset : name.Offset+nameSize]
		if i := bytes.IndexByte(nm, 0); i >= 0 {
			nm = nm[:i]
		}
		m := Module{Name: string(nm), Base: binary.LittleEndian.Uint64(buf[baseOff:]), Addr: addr}
		if haveState {
			m.State = binary.LittleEndian.Uint32(buf[stateOff:])
		}
		m.Settled = m.State == ModuleLive && (!haveKsyms || binary.LittleEndian.Uint64(buf[ksymsOff:]) == addr+coreOff)
		for _, f := range sizes {
			if f.Size == 8 {
				m.Size += binary.LittleEndian.Uint64(buf[f.Offset:])
			} else {
				m.Size += uint64(binary.LittleEndian.Uint32(buf[f.Offset:]))
			}
		}
		out = append(out, m)
		next = binary.LittleEndian.Uint64(buf[listOff:])
	}
	return out, nil
}

// maxModMem bounds module.mem[]: MOD_MEM_NUM_TYPES is 7.
const maxModMem = 16

// ModuleSignal is a cheap sign of module loads and unloads: the module
// list head (a load adds at the tail, so prev changes; removing the first
// or last module changes next or prev) and uevent_seqnum, which every
// module's KOBJ_ADD (sent by do_init_module once the module is live) and
// KOBJ_REMOVE (at unload) advances, with every other uevent. Two equal
// signals mean no module went live or away in between, short of 2^64
// uevents; a changed one means something may have (walk Modules).
type ModuleSignal struct {
	Next, Prev uint64 // modules.next, modules.prev
	Seqnum     uint64 // uevent_seqnum (0 when the kernel has none)
}

// ModuleSignal reads the signal: 16 bytes at the list head and 8 at
// uevent_seqnum.
func (k *Kernel) ModuleSignal() (ModuleSignal, error) {
	var sig ModuleSignal
	head, err := k.Symbols.Addr("modules")
	if err != nil {
		return sig, err
	}
	var b [16]byte
	if err := k.AS.ReadVirt(head, b[:]); err != nil {
		return sig, fmt.Errorf("reading the module list head at %#x: %w", head, err)
	}
	sig.Next, sig.Prev = binary.LittleEndian.Uint64(b[:]), binary.LittleEndian.Uint64(b[8:])
	if seq, err := k.Symbols.Addr("uevent_seqnum"); err == nil {
		if err := k.AS.ReadVirt(seq, b[:8]); err != nil {
			return sig, fmt.Errorf("reading uevent_seqnum at %#x: %w", seq, err)
		}
		sig.Seqnum = binary.LittleEndian.Uint64(b[:8])
	}
	return sig, nil
}
