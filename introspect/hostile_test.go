package introspect

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/symbols"
)

// The cases of issue 12 that a guest's BTF, lists and page tables can
// make: each must be an error (or a correct answer), never a panic, a
// fatal error or a giant allocation.

// loadTypes marshals types to raw BTF and loads it back the way Open does.
func loadTypes(t testing.TB, types ...btf.Type) *btf.Spec {
	t.Helper()
	b, err := btf.NewBuilder(types, nil)
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

var (
	tU32  = &btf.Int{Name: "unsigned int", Size: 4}
	tU64  = &btf.Int{Name: "long unsigned int", Size: 8}
	tChar = &btf.Int{Name: "char", Size: 1, Encoding: btf.Char}
)

// A struct with an anonymous member whose type is the struct itself made
// findMember recurse until the Go runtime killed the process with "fatal
// error: stack overflow".
func TestFieldOfSelfReferencingAnonymousMember(t *testing.T) {
	self := &btf.Struct{Name: "task_struct", Size: 16}
	self.Members = []btf.Member{{Name: "pid", Type: tU32}, {Type: self, Offset: 64}}
	a := &btf.Struct{Name: "a", Size: 16}
	b := &btf.Union{Name: "", Size: 16}
	a.Members = []btf.Member{{Type: b}}
	b.Members = []btf.Member{{Type: a}}
	spec := loadTypes(t, self, a)
	if f, err := FieldOf(spec, "task_struct.pid"); err != nil || f.Offset != 0 {
		t.Errorf("task_struct.pid = %+v, %v", f, err)
	}
	for _, path := range []string{"task_struct.nosuch", "a.nosuch"} {
		if _, err := FieldOf(spec, path); err == nil || !strings.Contains(err.Error(), "no member") {
			t.Errorf("%s: error %v, want no member", path, err)
		}
	}
}

// A chain of distinct anonymous members deeper than any kernel's is refused.
func TestFieldOfDeepAnonymousChain(t *testing.T) {
	inner := &btf.Struct{Size: 4, Members: []btf.Member{{Name: "x", Type: tU32}}}
	var typ btf.Type = inner
	for i := 0; i < 100; i++ {
		typ = &btf.Struct{Size: 4, Members: []btf.Member{{Type: typ}}}
	}
	top := &btf.Struct{Name: "deep", Size: 4, Members: []btf.Member{{Type: typ}}}
	spec := loadTypes(t, top)
	if _, err := FieldOf(spec, "deep.x"); err == nil || !strings.Contains(err.Error(), "nest") {
		t.Errorf("error %v, want one about nesting", err)
	}
}

// Offsets and sizes outside the outermost struct are refused.
func TestFieldOfOutsideStruct(t *testing.T) {
	s := &btf.Struct{Name: "task_struct", Size: 16, Members: []btf.Member{
		{Name: "in", Type: tU64, Offset: 64},
		{Name: "past", Type: tU64, Offset: 128},
		{Name: "huge", Type: &btf.Array{Index: tU32, Type: tU64, Nelems: 0xffffffff}, Offset: 0},
		{Name: "arr", Type: &btf.Array{Index: tU32, Type: tU32, Nelems: 2}, Offset: 0},
	}}
	spec := loadTypes(t, s)
	if f, err := FieldOf(spec, "task_struct.in"); err != nil || f.Offset != 8 {
		t.Errorf("in = %+v, %v", f, err)
	}
	for _, path := range []string{"task_struct.past", "task_struct.huge", "task_struct.huge[0x10000000]", "task_struct.arr[2]"} {
		if _, err := FieldOf(spec, path); err == nil {
			t.Errorf("%s: no error", path)
		}
	}
}

// guestKernel is a Kernel over a sliceMem with the direct map of its RAM
// at 0xffff888000000000, for list walks.
func guestKernel(t testing.TB, spec *btf.Spec, syms ...symbols.Symbol) (*Kernel, *pageTables) {
	t.Helper()
	pt := newPageTables(8<<20, 6<<20, false)
	for pa := uint64(0); pa < 6<<20; pa += Size2M {
		pt.mapPage(defaultDirectMap4+pa, pa, Size2M, rw, rw|pteNX)
	}
	k := &Kernel{Mem: pt.mem, AS: NewAddressSpace(pt.mem, pt.root, false), CR3: pt.root,
		DirectMapBase: defaultDirectMap4, BTF: spec, Symbols: symbols.NewTable(syms), fields: map[string]Field{}}
	return k, pt
}

func taskStruct(size uint32) *btf.Struct {
	listHead := &btf.Struct{Name: "list_head", Size: 16}
	listHead.Members = []btf.Member{
		{Name: "next", Type: &btf.Pointer{Target: listHead}},
		{Name: "prev", Type: &btf.Pointer{Target: listHead}, Offset: 64},
	}
	thread := &btf.Struct{Name: "thread_struct", Size: 16, Members: []btf.Member{{Name: "sp", Type: tU64, Offset: 64}}}
	vp := &btf.Pointer{Target: &btf.Void{}}
	return &btf.Struct{Name: "task_struct", Size: size, Members: []btf.Member{
		{Name: "__state", Type: tU32, Offset: 0},
		{Name: "pid", Type: tU32, Offset: 32},
		{Name: "tgid", Type: tU32, Offset: 64},
		{Name: "exit_state", Type: tU32, Offset: 96},
		{Name: "tasks", Type: listHead, Offset: 128},
		{Name: "real_parent", Type: vp, Offset: 256},
		{Name: "mm", Type: vp, Offset: 320},
		{Name: "comm", Type: &btf.Array{Index: tU32, Type: tChar, Nelems: 16}, Offset: 384},
		{Name: "thread", Type: thread, Offset: 512},
	}}
}

// task_struct of 16 bytes with members past it made Tasks slice out of
// range; 0xfffffff0 made it allocate 4 GiB per walk.
func TestTasksStructSize(t *testing.T) {
	const taskVA = defaultDirectMap4 + 0x100000
	for _, c := range []struct {
		size uint32
		want string // "" for success
	}{
		{16, "does not fit"},
		{0xfffffff0, ""},
		{1024, ""},
	} {
		k, pt := guestKernel(t, loadTypes(t, taskStruct(c.size)), symbols.Symbol{Name: "init_task", Addr: taskVA, Type: 'D'})
		b := pt.mem.b[0x100000:]
		binary.LittleEndian.PutUint32(b[4:], 0)          // pid
		binary.LittleEndian.PutUint64(b[16:], taskVA+16) // tasks.next: itself
		copy(b[48:], "swapper/0\n\x1b[2J")               // comm
		binary.LittleEndian.PutUint64(b[32:], taskVA)    // real_parent
		tasks, err := k.Tasks()
		if c.want != "" {
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("size %#x: Tasks = %v, %v; want error %q", c.size, tasks, err, c.want)
			}
			continue
		}
		if err != nil || len(tasks) != 1 || tasks[0].Comm != "swapper/0\n\x1b[2J" {
			t.Errorf("size %#x: Tasks = %+v, %v", c.size, tasks, err)
		}
	}
}

// A task list that never comes back to init_task stops at a loop or at its
// budget, with an error.
func TestTasksListLoopsAndBudget(t *testing.T) {
	const taskVA = defaultDirectMap4 + 0x100000
	k, pt := guestKernel(t, loadTypes(t, taskStruct(1024)), symbols.Symbol{Name: "init_task", Addr: taskVA, Type: 'D'})
	// init_task -> A -> B -> A ...
	for i, next := range []uint64{1, 2, 1} {
		binary.LittleEndian.PutUint64(pt.mem.b[0x100000+uint64(i)*0x1000+16:], taskVA+next*0x1000+16)
	}
	if _, err := k.Tasks(); err == nil || !strings.Contains(err.Error(), "loops") {
		t.Errorf("loop: %v", err)
	}
	k.WalkBudget = Budget{Bytes: 100}
	var be *BudgetError
	if _, err := k.Tasks(); !errors.As(err, &be) || !strings.Contains(err.Error(), "task walk exceeded its budget") {
		t.Errorf("budget: %v", err)
	}
}

func moduleStruct(size uint32, memElems uint32, nameOff uint32) *btf.Struct {
	listHead := &btf.Struct{Name: "list_head", Size: 16}
	listHead.Members = []btf.Member{
		{Name: "next", Type: &btf.Pointer{Target: listHead}},
		{Name: "prev", Type: &btf.Pointer{Target: listHead}, Offset: 64},
	}
	mm := &btf.Struct{Name: "module_memory", Size: 16, Members: []btf.Member{
		{Name: "base", Type: &btf.Pointer{Target: &btf.Void{}}},
		{Name: "size", Type: tU32, Offset: 64},
	}}
	return &btf.Struct{Name: "module", Size: size, Members: []btf.Member{
		{Name: "list", Type: listHead, Offset: 64},
		{Name: "name", Type: &btf.Array{Index: tU32, Type: tChar, Nelems: 56}, Offset: btf.Bits(nameOff * 8)},
		{Name: "mem", Type: &btf.Array{Index: tU32, Type: mm, Nelems: memElems}, Offset: 1024 * 8},
	}}
}

// module.mem with 0xffffffff elements made lsmod allocate until the
// process died; module sizes and offsets past the struct made it slice out
// of range.
func TestModulesHostileLayout(t *testing.T) {
	const head = defaultDirectMap4 + 0x200000
	const mod = defaultDirectMap4 + 0x201000
	for _, c := range []struct {
		name                string
		size, elems, nameOf uint32
		want                string
	}{
		{"mem 0xffffffff", 0x2000, 0xffffffff, 24, "neither mem[] nor core_layout"},
		{"mem 100", 0x2000, 100, 24, "module.mem has 100 elements"},
		{"name past struct", 0x480, 7, 0x470, "does not fit"},
		{"huge struct", 0xfffffff0, 7, 24, ""},
		{"real", 0x500, 7, 24, ""},
	} {
		k, pt := guestKernel(t, loadTypes(t, moduleStruct(c.size, c.elems, c.nameOf)), symbols.Symbol{Name: "modules", Addr: head, Type: 'D'})
		binary.LittleEndian.PutUint64(pt.mem.b[0x200000:], mod+8)
		m := pt.mem.b[0x201000:]
		binary.LittleEndian.PutUint64(m[8:], head)
		copy(m[24:], "evil\r\nmod")
		binary.LittleEndian.PutUint64(m[1024:], 0xffffffffc0000000)
		binary.LittleEndian.PutUint32(m[1024+8:], 0x1000)
		mods, err := k.Modules()
		if c.want != "" {
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: Modules = %v, %v; want error %q", c.name, mods, err, c.want)
			}
			continue
		}
		if err != nil || len(mods) != 1 || mods[0].Name != "evil\r\nmod" || mods[0].Size != 0x1000 || mods[0].Base != 0xffffffffc0000000 {
			t.Errorf("%s: Modules = %+v, %v", c.name, mods, err)
		}
	}
}

// A page-table page that lists itself in every entry: Mappings over a
// large range stops at its limits instead of collecting 512^4 leaves.
func TestMappingsSelfReferencingTable(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	for i := uint64(0); i < 512; i++ {
		pt.set(pt.root+i*8, pt.root|rw)
	}
	as := NewAddressSpace(pt.mem, pt.root, false)
	maps, err := as.Mappings(0, 1<<47)
	if err == nil || !strings.Contains(err.Error(), "giving up") {
		t.Fatalf("Mappings = %d mappings, %v", len(maps), err)
	}
	// The kernel-image region stays bounded by its size (1 GiB: at most
	// 262,144 pages) and merges.
	maps, err = as.Mappings(KernelImageStart, KernelImageEnd)
	if err != nil || len(maps) == 0 {
		t.Fatalf("image region: %d mappings, %v", len(maps), err)
	}
}

// The error of a guest that maps less than 2 MiB of kernel image, with no
// vCPU failing, printed "%!w(<nil>)".
func TestOpenErrorNoNilWrap(t *testing.T) {
	pt := newPageTables(4<<20, 3<<20, false)
	pt.mapPage(KernelImageStart+0x1000000, 0, Size4K, rw, ptePresent)
	_, err := Open(context.Background(), pt.mem, []hypervisor.CPUState{{CR0: 1 << 31, CR3: pt.root}})
	if err == nil || strings.Contains(err.Error(), "%!") {
		t.Errorf("Open error = %v", err)
	}
}

// An attach that reads more than its budget stops with an error naming it.
func TestOpenBudget(t *testing.T) {
	pt := newPageTables(16<<20, 14<<20, false)
	for i := uint64(0); i < 4; i++ {
		pt.mapPage(DefaultText+i*Size2M, i*Size2M, Size2M, rw, ptePresent|pteNX)
	}
	cpus := []hypervisor.CPUState{{CR0: 1 << 31, CR3: pt.root}}
	_, err := OpenWithBudget(context.Background(), pt.mem, cpus, Budget{Bytes: 1 << 20})
	var be *BudgetError
	if !errors.As(err, &be) || !strings.Contains(err.Error(), "attach exceeded its budget of 1048576 bytes") {
		t.Errorf("Open error = %v, want the attach budget", err)
	}
	// Without the limit, it fails for what the memory is (no kallsyms).
	_, err = Open(context.Background(), pt.mem, cpus)
	if err == nil || errors.As(err, &be) || !strings.Contains(err.Error(), "kallsyms") {
		t.Errorf("Open error = %v", err)
	}
}
