package cheader

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/hvpatch/hvpatch/internal/testguest"
)

// fixture is a small BTF with what the emitter must get right: a pointer
// cycle, anonymous unions and structs, bitfields, an aligned member's gap,
// trailing padding, a packed struct, an enum used by value, a typedef of a
// function pointer, a variadic function, and two structs of one name.
func fixture(t *testing.T) *btf.Spec {
	t.Helper()
	u8 := &btf.Int{Name: "unsigned char", Size: 1}
	u16 := &btf.Int{Name: "short unsigned int", Size: 2}
	i32 := &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	u64 := &btf.Int{Name: "long long unsigned int", Size: 8}
	char := &btf.Int{Name: "char", Size: 1, Encoding: btf.Signed | btf.Char}
	u64t := &btf.Typedef{Name: "u64", Type: u64}
	color := &btf.Enum{Name: "color", Size: 4, Values: []btf.EnumValue{{Name: "RED", Value: 0}, {Name: "GREEN", Value: 1}, {Name: "BIG", Value: 0xfffffff0}}}
	anonEnum := &btf.Enum{Size: 4, Values: []btf.EnumValue{{Name: "TASK_COMM_LEN", Value: 16}}}

	node := &btf.Struct{Name: "node", Size: 16}
	node.Members = []btf.Member{{Name: "next", Type: &btf.Pointer{Target: node}}, {Name: "owner", Type: &btf.Pointer{Target: &btf.Fwd{Name: "list", Kind: btf.FwdStruct}}, Offset: 64}}
	list := &btf.Struct{Name: "list", Size: 8, Members: []btf.Member{{Name: "head", Type: &btf.Pointer{Target: node}}}}

	cb := &btf.FuncProto{Return: i32, Params: []btf.FuncParam{{Name: "n", Type: &btf.Pointer{Target: node}}, {Name: "arg", Type: &btf.Pointer{Target: &btf.Void{}}}}}
	cbT := &btf.Typedef{Name: "visit_fn", Type: &btf.Pointer{Target: cb}}

	anonStruct := &btf.Struct{Size: 8, Members: []btf.Member{{Name: "lo", Type: u32}, {Name: "hi", Type: u32, Offset: 32}}}
	anonUnion := &btf.Union{Size: 8, Members: []btf.Member{{Name: "whole", Type: u64t}, {Type: anonStruct}}}
	// A cache-line aligned member: 40 bytes of gap the compiler would not
	// leave by itself, and trailing padding to 128.
	big := &btf.Struct{Name: "big", Size: 128, Members: []btf.Member{
		{Name: "flags", Type: u32},
		{Name: "a", Type: u32, Offset: 32, BitfieldSize: 3},
		{Name: "b", Type: u32, Offset: 35, BitfieldSize: 13},
		{Name: "c", Type: u16, Offset: 48},
		{Type: anonUnion, Offset: 64},
		{Name: "first", Type: list, Offset: 128},
		{Name: "col", Type: color, Offset: 192},
		{Name: "name", Type: &btf.Array{Type: char, Index: u32, Nelems: 16}, Offset: 224},
		{Name: "visit", Type: cbT, Offset: 384},
		{Name: "ro", Type: &btf.Pointer{Target: &btf.Const{Type: char}}, Offset: 448},
		{Name: "aligned", Type: u64, Offset: 512},
		{Name: "matrix", Type: &btf.Array{Type: &btf.Pointer{Target: &btf.Array{Type: u8, Index: u32, Nelems: 4}}, Index: u32, Nelems: 2}, Offset: 576},
	}}
	packed := &btf.Struct{Name: "wire", Size: 7, Members: []btf.Member{{Name: "tag", Type: u8}, {Name: "len", Type: u32, Offset: 8}, {Name: "crc", Type: u16, Offset: 40}}}
	dup1 := &btf.Struct{Name: "dup", Size: 4, Members: []btf.Member{{Name: "x", Type: i32}}}
	dup2 := &btf.Struct{Name: "dup", Size: 8, Members: []btf.Member{{Name: "y", Type: u64}}}
	holder := &btf.Struct{Name: "holder", Size: 12, Members: []btf.Member{{Name: "one", Type: dup1}, {Name: "two", Type: dup2, Offset: 32}}}
	holder.Size = 16
	holder.Members[1].Offset = 64
	printk := &btf.Func{Name: "printk_like", Linkage: btf.GlobalFunc, Type: &btf.FuncProto{Return: i32, Params: []btf.FuncParam{{Name: "fmt", Type: &btf.Pointer{Target: &btf.Const{Type: char}}}, {Type: &btf.Void{}}}}}

	b, err := btf.NewBuilder([]btf.Type{big, packed, holder, anonEnum, printk}, nil)
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

func TestHeaderOfFixture(t *testing.T) {
	spec := fixture(t)
	var b bytes.Buffer
	st, err := Write(&b, spec, Options{Comment: "fixture"})
	if err != nil {
		t.Fatal(err)
	}
	h := b.String()
	for _, want := range []string{
		"struct node;", "struct list;", // declared ahead: the cycle needs it
		"typedef int (*visit_fn)(struct node *n, void *arg);",
		"struct dup___2 {", "struct dup___2 two;",
		"} __hvpatch_packed;",
		"unsigned int a: 3;", "unsigned int b: 13;",
		"char const *ro;", "unsigned char (*matrix[2])[4];",
		"TASK_COMM_LEN = 16,", "BIG = 4294967280U,",
	} {
		if !strings.Contains(h, want) {
			t.Errorf("header lacks %q", want)
		}
	}
	// Dependency order: what big holds by value comes before it.
	for _, before := range []string{"struct list {", "enum color {", "typedef long long unsigned int u64;", "typedef int (*visit_fn)"} {
		if i, j := strings.Index(h, before), strings.Index(h, "struct big {"); i < 0 || i > j {
			t.Errorf("%q is not before struct big", before)
		}
	}
	if st.Types == 0 || strings.Contains(h, "printk_like") {
		t.Errorf("stats %+v; functions are written only when asked for", st)
	}
	checkWithGCC(t, spec, h)

	// --type: the named type and what it needs by value; pointed-to
	// structs only declared; a function as an extern prototype.
	b.Reset()
	if _, err := Write(&b, spec, Options{Types: []string{"list", "printk_like"}}); err != nil {
		t.Fatal(err)
	}
	h = b.String()
	if !strings.Contains(h, "struct list {") || strings.Contains(h, "struct node {") || !strings.Contains(h, "struct node;") ||
		strings.Contains(h, "struct big") || !strings.Contains(h, "extern int printk_like(char const *fmt, ...);") {
		t.Errorf("--type list printk_like:\n%s", h)
	}
	checkWithGCC(t, spec, h)
	if _, err := Write(&b, spec, Options{Types: []string{"no_such_type"}}); err == nil || !strings.Contains(err.Error(), "no_such_type") {
		t.Errorf("unknown type: %v", err)
	}
}

// checkWithGCC compiles the header with a static assertion of the size of
// every struct and union it defines and the offset of every named,
// non-bitfield member: the layout is the BTF's, not gcc's guess.
func checkWithGCC(t *testing.T, spec *btf.Spec, header string) {
	t.Helper()
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("gcc is needed to compile the header")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "guest.h"), []byte(header), 0o644); err != nil {
		t.Fatal(err)
	}
	var c strings.Builder
	c.WriteString("#include \"guest.h\"\n#define OFF(t, m) __builtin_offsetof(t, m)\n")
	n := 0
	seen := map[string]int{} // tag names as the writer suffixes them
	for typ, err := range spec.All() {
		if err != nil {
			t.Fatal(err)
		}
		var kw string
		var ms []btf.Member
		var size uint32
		switch u := typ.(type) {
		case *btf.Struct:
			kw, ms, size = "struct", u.Members, u.Size
		case *btf.Union:
			kw, ms, size = "union", u.Members, u.Size
		case *btf.Enum:
			if u.Name != "" {
				seen[u.Name]++
			}
			continue
		default:
			continue
		}
		name := typ.TypeName()
		if name == "" {
			continue
		}
		if seen[name]++; seen[name] > 1 {
			name = fmt.Sprintf("%s___%d", name, seen[name])
		}
		if !strings.Contains(header, kw+" "+name+" {") {
			continue // anonymous, or not defined in this header (or renamed ___N)
		}
		full := kw + " " + name
		fmt.Fprintf(&c, "_Static_assert(sizeof(%s) == %d, \"size of %s\");\n", full, size, full)
		for _, m := range ms {
			if m.Name == "" || m.BitfieldSize != 0 {
				continue
			}
			fmt.Fprintf(&c, "_Static_assert(OFF(%s, %s) == %d, \"%s.%s\");\n", full, m.Name, m.Offset/8, full, m.Name)
			n++
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "check.c"), []byte(c.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(gcc, "-std=gnu11", "-Wall", "-Werror", "-Wno-unused", "-ffreestanding", "-nostdinc", "-c", "-o", filepath.Join(dir, "check.o"), filepath.Join(dir, "check.c")).CombinedOutput()
	if err != nil {
		lines := strings.Split(string(out), "\n")
		t.Fatalf("gcc on the header (%d offsets checked): %v\n%s", n, err, strings.Join(lines[:min(len(lines), 40)], "\n"))
	}
}

// TestHeaderOfGuestKernels: the header of each guest kernel's own BTF (the
// .BTF section of the vmlinux the guests boot) compiles with gcc, with
// every struct's size and every member's offset as the BTF says.
func TestHeaderOfGuestKernels(t *testing.T) {
	testguest.Need(t)
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range kernels {
		t.Run(k.Series, func(t *testing.T) {
			f, err := elf.Open(k.Vmlinux())
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			sec := f.Section(".BTF")
			if sec == nil {
				t.Fatalf("%s has no .BTF", k.Vmlinux())
			}
			data, err := sec.Data()
			if err != nil {
				t.Fatal(err)
			}
			spec, err := btf.LoadSpecFromReader(bytes.NewReader(data))
			if err != nil {
				t.Fatal(err)
			}
			var b bytes.Buffer
			st, err := Write(&b, spec, Options{Comment: k.Release})
			if err != nil {
				t.Fatal(err)
			}
			if st.Types < 10000 {
				t.Errorf("only %d types written", st.Types)
			}
			checkWithGCC(t, spec, b.String())
		})
	}
}
