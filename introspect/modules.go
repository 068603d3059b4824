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
}

// Modules walks the kernel's module list. Base and Size follow
// /proc/modules: since 6.4 they come from mod->mem[] (MOD_TEXT first),
// before that from core_layout and init_layout.
func (k *Kernel) Modules() ([]Module, error) {
	head, err := k.Symbols.Addr("modules")
	if err != nil {
		return nil, err
	}
	listOff, err := k.Offset("module.list")
	if err != nil {
		return nil, err
	}
	name, err := k.Field("module.name")
	if err != nil {
		return nil, err
	}
	size, err := SizeOf(k.BTF, "module")
	if err != nil {
		return nil, err
	}
	// The base is the first part's; the sizes of all parts are summed
	// (init parts are zero once the module finished loading).
	var baseOff uint64
	var sizes []Field
	if mem, err := k.Field("module.mem"); err == nil {
		arr, ok := btf.UnderlyingType(mem.Type).(*btf.Array)
		if !ok {
			return nil, fmt.Errorf("module.mem is not an array")
		}
		for i := 0; i < int(arr.Nelems); i++ {
			f, err := k.Field(fmt.Sprintf("module.mem[%d].size", i))
			if err != nil {
				return nil, err
			}
			sizes = append(sizes, f)
		}
		if baseOff, err = k.Offset("module.mem[0].base"); err != nil {
			return nil, err
		}
	} else {
		if baseOff, err = k.Offset("module.core_layout.base"); err != nil {
			return nil, fmt.Errorf("struct module has neither mem[] nor core_layout: %w", err)
		}
		for _, p := range []string{"module.core_layout.size", "module.init_layout.size"} {
			f, err := k.Field(p)
			if err != nil {
				return nil, err
			}
			sizes = append(sizes, f)
		}
	}

	buf := make([]byte, size)
	var out []Module
	seen := map[uint64]bool{}
	next, err := k.AS.ReadUint64(head)
	if err != nil {
		return nil, fmt.Errorf("reading the module list head at %#x: %w", head, err)
	}
	for next != head {
		addr := next - listOff
		if seen[addr] || len(out) > maxListLength {
			return nil, fmt.Errorf("module list loops at %#x", addr)
		}
		seen[addr] = true
		if err := k.AS.ReadVirt(addr, buf); err != nil {
			return nil, fmt.Errorf("reading struct module at %#x: %w", addr, err)
		}
		nm := buf[name.Offset : name.Offset+name.Size]
		if i := bytes.IndexByte(nm, 0); i >= 0 {
			nm = nm[:i]
		}
		m := Module{Name: string(nm), Base: binary.LittleEndian.Uint64(buf[baseOff:]), Addr: addr}
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
