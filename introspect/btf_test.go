package introspect

import (
	"bytes"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// testSpec builds a small raw BTF blob shaped like the kernel's types
// (anonymous unions, nested structs, arrays, bitfields) and loads it back
// the way Open does.
func testSpec(t *testing.T) *btf.Spec {
	t.Helper()
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	u64 := &btf.Int{Name: "long unsigned int", Size: 8}
	char := &btf.Int{Name: "char", Size: 1, Encoding: btf.Char}
	listHead := &btf.Struct{Name: "list_head", Size: 16}
	listHead.Members = []btf.Member{
		{Name: "next", Type: &btf.Pointer{Target: listHead}, Offset: 0},
		{Name: "prev", Type: &btf.Pointer{Target: listHead}, Offset: 64},
	}
	thread := &btf.Struct{Name: "thread_struct", Size: 16, Members: []btf.Member{
		{Name: "es", Type: u64, Offset: 0},
		{Name: "sp", Type: u64, Offset: 64},
	}}
	memory := &btf.Struct{Name: "module_memory", Size: 16, Members: []btf.Member{
		{Name: "base", Type: u64, Offset: 0},
		{Name: "size", Type: u32, Offset: 64},
	}}
	anonUnion := &btf.Union{Size: 8, Members: []btf.Member{
		{Name: "flags", Type: u64},
		{Type: &btf.Struct{Size: 8, Members: []btf.Member{
			{Name: "lo", Type: u32, Offset: 0},
			{Name: "hi", Type: u32, Offset: 32},
		}}},
	}}
	task := &btf.Struct{Name: "task_struct", Size: 128, Members: []btf.Member{
		{Name: "__state", Type: u32, Offset: 0},
		{Name: "bits", Type: u32, Offset: 32, BitfieldSize: 3},
		{Type: anonUnion, Offset: 64},
		{Name: "tasks", Type: listHead, Offset: 128},
		{Name: "comm", Type: &btf.Array{Index: u32, Type: char, Nelems: 16}, Offset: 256},
		{Name: "thread", Type: thread, Offset: 384},
		{Name: "mem", Type: &btf.Array{Index: u32, Type: memory, Nelems: 3}, Offset: 512},
	}}
	// As in 5.10: SYSTEM_RUNNING is 2 (6.1 added SYSTEM_FREEING_INITMEM before it).
	states := &btf.Enum{Name: "system_states", Size: 4, Values: []btf.EnumValue{
		{Name: "SYSTEM_BOOTING", Value: 0}, {Name: "SYSTEM_SCHEDULING", Value: 1}, {Name: "SYSTEM_RUNNING", Value: 2},
	}}
	b, err := btf.NewBuilder([]btf.Type{task, &btf.Fwd{Name: "module"}, states}, nil)
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

func TestFieldOf(t *testing.T) {
	spec := testSpec(t)
	for _, c := range []struct {
		path      string
		off, size uint64
	}{
		{"task_struct.__state", 0, 4},
		{"task_struct.flags", 8, 8}, // inside an anonymous union
		{"task_struct.hi", 12, 4},   // two anonymous levels down
		{"task_struct.tasks", 16, 16},
		{"task_struct.tasks.prev", 24, 8},
		{"task_struct.comm", 32, 16},
		{"task_struct.comm[3]", 35, 1},
		{"task_struct.thread.sp", 56, 8},
		{"task_struct.mem[2].size", 64 + 32 + 8, 4},
		{"list_head.prev", 8, 8},
	} {
		f, err := FieldOf(spec, c.path)
		if err != nil {
			t.Errorf("FieldOf(%q): %v", c.path, err)
			continue
		}
		if f.Offset != c.off || f.Size != c.size {
			t.Errorf("FieldOf(%q) = offset %d size %d, want %d, %d", c.path, f.Offset, f.Size, c.off, c.size)
		}
	}
	if n, err := SizeOf(spec, "task_struct"); err != nil || n != 128 {
		t.Errorf("SizeOf(task_struct) = %d, %v", n, err)
	}
	for path, want := range map[string]string{
		"task_struct.nope":     `has no member "nope"`,
		"task_struct.bits":     "bitfield",
		"task_struct.comm[16]": "out of range",
		"task_struct.tasks[0]": "not an array",
		"no_such.x":            `no type "no_such"`,
		"module.list":          "not a struct", // only a forward declaration exists
		"task_struct":          "want TYPE.MEMBER",
		"task_struct.comm[x]":  "bad index",
	} {
		_, err := FieldOf(spec, path)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), path) && path != "no_such.x" {
			t.Errorf("FieldOf(%q) error = %v, want one containing %q", path, err, want)
		}
	}
	if _, err := FieldOf(nil, "task_struct.pid"); err != ErrNoBTF {
		t.Errorf("FieldOf without BTF: %v", err)
	}
}

func TestEnumValue(t *testing.T) {
	spec := testSpec(t)
	if v, err := EnumValue(spec, "system_states", "SYSTEM_RUNNING"); err != nil || v != 2 {
		t.Fatalf("SYSTEM_RUNNING = %d, %v; want 2", v, err)
	}
	for _, c := range [][2]string{{"system_states", "SYSTEM_FREEING_INITMEM"}, {"no_such_enum", "X"}, {"task_struct", "tasks"}} {
		if v, err := EnumValue(spec, c[0], c[1]); err == nil {
			t.Errorf("%s.%s = %d, want an error", c[0], c[1], v)
		}
	}
	if _, err := EnumValue(nil, "system_states", "SYSTEM_RUNNING"); err != ErrNoBTF {
		t.Errorf("nil spec: %v", err)
	}
}
