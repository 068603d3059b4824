package introspect

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/hvpatch/hvpatch/symbols"
)

// moduleSymTypes extends moduleStruct with what ModuleSymbols reads:
// module.kallsyms, module.syms/num_syms, module.state, struct mod_kallsyms
// and the place-relative struct kernel_symbol.
func moduleSymTypes() []btf.Type {
	m := moduleStruct(0x500, 7, 24)
	tS32 := &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}
	ksym := &btf.Struct{Name: "kernel_symbol", Size: 12, Members: []btf.Member{
		{Name: "value_offset", Type: tS32},
		{Name: "name_offset", Type: tS32, Offset: 32},
		{Name: "namespace_offset", Type: tS32, Offset: 64},
	}}
	mk := &btf.Struct{Name: "mod_kallsyms", Size: 32, Members: []btf.Member{
		{Name: "symtab", Type: &btf.Pointer{Target: &btf.Void{}}},
		{Name: "num_symtab", Type: tU32, Offset: 64},
		{Name: "strtab", Type: &btf.Pointer{Target: tChar}, Offset: 128},
		{Name: "typetab", Type: &btf.Pointer{Target: tChar}, Offset: 192},
	}}
	m.Members = append(m.Members,
		btf.Member{Name: "kallsyms", Type: &btf.Pointer{Target: mk}, Offset: 0x480 * 8},
		btf.Member{Name: "syms", Type: &btf.Pointer{Target: ksym}, Offset: 0x488 * 8},
		btf.Member{Name: "num_syms", Type: tU32, Offset: 0x490 * 8},
		btf.Member{Name: "state", Type: tU32, Offset: 0x494 * 8},
	)
	return []btf.Type{m, mk, ksym}
}

// One module "dummy" with three symtab entries: the null symbol (left out),
// a global function it does not export (listed lower case, as
// /proc/kallsyms does) and one it exports (upper case).
func moduleSymFixture(t *testing.T) (*Kernel, []byte) {
	const B = defaultDirectMap4 + 0x100000
	data := make([]byte, 0x4000)
	le64 := func(off int, v uint64) { binary.LittleEndian.PutUint64(data[off:], v) }
	le32 := func(off int, v uint32) { binary.LittleEndian.PutUint32(data[off:], v) }
	le64(0, B+0x1000+8) // modules.next
	le64(0x1000+8, B)   // the only module's list.next: back to the head
	copy(data[0x1000+24:], "dummy")
	le64(0x1000+1024, 0xffffffffc0000000)
	le32(0x1000+1024+8, 0x1000)
	le64(0x1000+0x480, B+0x2000) // kallsyms
	le64(0x1000+0x488, B+0x3000) // syms
	le32(0x1000+0x490, 1)        // num_syms
	le64(0x2000, B+0x2100)       // symtab
	le32(0x2000+8, 3)            // num_symtab
	le64(0x2000+16, B+0x2200)    // strtab
	le64(0x2000+24, B+0x2300)    // typetab
	copy(data[0x2200:], "\x00dummy_xmit\x00dummy_exported\x00")
	copy(data[0x2300:], "\x00TT")
	le32(0x2100+24, 1) // dummy_xmit
	le64(0x2100+24+8, 0xffffffffc0000010)
	le32(0x2100+48, 12)         // dummy_exported
	le64(0x2100+48+8, B+0x3800) // within rel32 of its kernel_symbol
	// kernel_symbol at B+0x3000: value and name place-relative.
	le32(0x3000, 0x800)
	le32(0x3004, uint32(int32(0x3100-0x3004)))
	copy(data[0x3100:], "dummy_exported\x00")
	return walkKernel(t, loadTypes(t, moduleSymTypes()...), data, "modules"), data
}

func TestModuleSymbols(t *testing.T) {
	k, _ := moduleSymFixture(t)
	got, err := k.ModuleSymbols()
	if err != nil {
		t.Fatal(err)
	}
	want := []symbols.Symbol{
		{Name: "dummy_xmit", Addr: 0xffffffffc0000010, Type: 't', Module: "dummy"},
		{Name: "dummy_exported", Addr: defaultDirectMap4 + 0x103800, Type: 'T', Module: "dummy"},
	}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("ModuleSymbols = %+v, want %+v", got, want)
	}
}

// The guest controls every count and pointer: each is bounded or checked.
func TestModuleSymbolsHostile(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(d []byte)
		want string
	}{
		{"num_symtab huge", func(d []byte) { binary.LittleEndian.PutUint32(d[0x2008:], 0xffffffff) }, "num_symtab"},
		{"name past strtab", func(d []byte) { binary.LittleEndian.PutUint32(d[0x2100+24:], 0xfff000) }, "strtab at"},
		{"num_syms huge", func(d []byte) { binary.LittleEndian.PutUint32(d[0x1000+0x490:], 0xffffffff) }, "num_syms"},
		{"symtab unmapped", func(d []byte) { binary.LittleEndian.PutUint64(d[0x2000:], 0x1234) }, "reading 3 symbols"},
	} {
		k, data := moduleSymFixture(t)
		c.edit(data)
		k = walkKernel(t, k.BTF, data, "modules")
		syms, err := k.ModuleSymbols()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: ModuleSymbols = %v, %v; want an error about %q", c.name, syms, err, c.want)
		}
	}
}
