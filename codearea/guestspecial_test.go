package codearea

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/linker"
	"github.com/hvpatch/hvpatch/symbols"
)

// Guest state for the linker: static keys and CPU features read from the
// fixture's memory, alt_instr's size from its BTF, NAME,N from kallsyms.
const (
	fxBootCPUData = fxText + 0x20000
	fxKeyOff      = fxText + 0x21000
	fxKeyOn       = fxText + 0x21020
	fxCapOffset   = 0x18 // cpuinfo_x86.x86_capability in the fixture's BTF
)

func stateSpec(t *testing.T) *btf.Spec {
	t.Helper()
	u8 := &btf.Int{Name: "unsigned char", Size: 1}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	ulong := &btf.Int{Name: "long unsigned int", Size: 8}
	caps := &btf.Union{Size: 96, Members: []btf.Member{
		{Name: "x86_capability", Type: &btf.Array{Index: u32, Type: u32, Nelems: 24}},
		{Name: "x86_capability_alignment", Type: ulong},
	}}
	cpuinfo := &btf.Struct{Name: "cpuinfo_x86", Size: 0x18 + 96, Members: []btf.Member{
		{Name: "x86", Type: u8, Offset: 0},
		{Type: caps, Offset: fxCapOffset * 8},
	}}
	alt := &btf.Struct{Name: "alt_instr", Size: 14, Members: []btf.Member{
		{Name: "instr_offset", Type: u32, Offset: 0},
	}}
	b, err := btf.NewBuilder([]btf.Type{cpuinfo, alt}, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

func TestLinkForGuestState(t *testing.T) {
	k, m := newFixture()
	k.BTF = stateSpec(t)
	extra := []symbols.Symbol{
		{Name: "boot_cpu_data", Addr: fxBootCPUData, Type: 'D'},
		{Name: "hvpt_key_off", Addr: fxKeyOff, Type: 'D'},
		{Name: "hvpt_key_on", Addr: fxKeyOn, Type: 'D'},
		{Name: "hvpt_counter", Addr: fxText + 0x21040, Type: 'D'},
		{Name: "hvpt_sink", Addr: fxText + 0x21050, Type: 'D'},
		{Name: "__fentry__", Addr: fxText + 0x10200, Type: 'T'},
		{Name: "dup_static", Addr: fxText + 0x10400, Type: 't'},
		{Name: "dup_static", Addr: fxText + 0x10300, Type: 't'},
	}
	k.Symbols = symbols.NewTable(append(k.Symbols.All(), extra...))
	put32 := func(va uint64, v uint32) { binary.LittleEndian.PutUint32(m.b[fxImagePA+(va-fxText):], v) }
	put32(fxKeyOff, 1)                          // hvpt_key_off enabled
	put32(fxKeyOn, 0xffffffff)                  // -1: being enabled, not yet enabled
	put32(fxBootCPUData+fxCapOffset+4*4, 1<<31) // word 4 bit 31: X86_FEATURE_HYPERVISOR
	put32(fxBootCPUData+fxCapOffset+3*4, 1<<21) // word 3 bit 21: X86_FEATURE_ALWAYS
	put32(fxBootCPUData+fxCapOffset+22*4, 1<<5) // first bug word, bit 5

	opt, resolve, err := LinkFor(k, "version_proc_show")
	if err != nil {
		t.Fatal(err)
	}
	if opt.AltLayout != linker.AltLayout612 {
		t.Errorf("AltLayout %d, want 14 from BTF", opt.AltLayout)
	}
	for _, c := range []struct {
		addr uint64
		want bool
	}{{fxKeyOff, true}, {fxKeyOn, false}} {
		if on, err := opt.KeyEnabled(c.addr); err != nil || on != c.want {
			t.Errorf("KeyEnabled(%#x) = %v, %v; want %v", c.addr, on, err, c.want)
		}
	}
	if _, err := opt.KeyEnabled(0xffffffffa0000000); err == nil {
		t.Error("KeyEnabled of an unmapped address succeeded")
	}
	for _, c := range []struct {
		bit  uint16
		want bool
	}{{4*32 + 31, true}, {3*32 + 21, true}, {3*32 + 18, false}, {22*32 + 5, true}, {22*32 + 4, false}} {
		if on, err := opt.CPUFeature(c.bit); err != nil || on != c.want {
			t.Errorf("CPUFeature(%d) = %v, %v; want %v", c.bit, on, err, c.want)
		}
	}
	if _, err := opt.CPUFeature(24 * 32); err == nil {
		t.Error("CPUFeature beyond the array succeeded")
	}

	// NAME,N: the N-th in address order; a bare ambiguous name stays unresolved.
	for _, c := range []struct {
		name string
		addr uint64
		ok   bool
	}{
		{"dup_static,1", fxText + 0x10300, true},
		{"dup_static,2", fxText + 0x10400, true},
		{"dup_static,3", 0, false},
		{"dup_static,0", 0, false},
		{"dup_static,+1", 0, false},
		{"dup_static", 0, false},
		{"seq_printf,1", fxText + 0x10100, true},
		{"seq_printf", fxText + 0x10100, true},
	} {
		if a, ok := resolve(c.name); ok != c.ok || a != c.addr {
			t.Errorf("resolve(%q) = %#x, %v; want %#x, %v", c.name, a, ok, c.addr, c.ok)
		}
	}

	// A kbuild-built 6.12 object linked with what LinkFor read: the keys'
	// and features' states show in the bytes.
	obj, err := linker.Load("../linker/testdata/kernelobj/hvpt_special_612.o")
	if err != nil {
		t.Fatal(err)
	}
	lay := linker.Layout{TextBase: fxText + 0x100000, TextLimit: 0x1000, DataBase: fxText + 0x101000, DataLimit: 0x1000}
	resolveThunk := func(name string) (uint64, bool) {
		if name == linker.ReturnThunk {
			return fxText + 0x10500, true // the fixture returns with ret: PlainReturns is set
		}
		return resolve(name)
	}
	img, err := obj.LinkWithOptions("hvpt_warn", lay, resolveThunk, opt)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{
		"hvpt_branch_unlikely": {0xeb, 0x08},                   // key_off enabled, branch 0: jmp
		"hvpt_branch_likely":   {0xeb, 0x08},                   // key_on -1 (not enabled), branch 1: jmp
		"hvpt_alt":             {0x0f, 0x1f, 0x00},             // LFENCE_RDTSC clear: NOPs
		"hvpt_cpu_has":         {0x0f, 0x1f, 0x44, 0x00, 0x00}, // HYPERVISOR set: fall through
	}
	off := map[string]uint64{"hvpt_branch_unlikely": 9, "hvpt_branch_likely": 0xb, "hvpt_alt": 9, "hvpt_cpu_has": 0xb}
	for _, s := range img.Map.Symbols {
		if w, ok := want[s.Name]; ok {
			at := s.Addr + off[s.Name] - lay.TextBase
			if got := img.Text[at : at+uint64(len(w))]; !bytes.Equal(got, w) {
				t.Errorf("%s+%#x: % x, want % x", s.Name, off[s.Name], got, w)
			}
			delete(want, s.Name)
		}
	}
	if len(want) != 0 {
		t.Errorf("functions not found in the link map: %v", want)
	}
}
