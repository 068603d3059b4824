package linker

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// A guest-like layout: kernel image around 0xffffffffbb800000 (as seen on a
// 6.1 guest), the code area in a free 2 MiB slot above it.
const (
	testTextBase = 0xffffffffbe400000
	testDataBase = 0xffffffffbe401000
	pageSize     = 0x1000
)

var testLayout = Layout{TextBase: testTextBase, DataBase: testDataBase, TextLimit: pageSize, DataLimit: pageSize}

// Synthetic kallsyms: addresses inside that kernel image, plus one in the
// direct map, far beyond rel32 reach of the code area.
var testKallsyms = map[string]uint64{
	"seq_printf":               0xffffffffbc3a1b20,
	"init_uts_ns":              0xffffffffbd81e1c0,
	"__x86_return_thunk":       0xffffffffbcc05f00,
	"__x86_indirect_thunk_rax": 0xffffffffbcc05a00,
	"__x86_indirect_thunk_rdx": 0xffffffffbcc05a60,
	"printk":                   0xffffffffbbf00010,
	"memset":                   0xffffffffbcb0c4c0,
	"far_away":                 0xffff888000100000,
	"small_abs":                0x1234,
}

func testResolver(name string) (uint64, bool) {
	a, ok := testKallsyms[name]
	return a, ok
}

// repoRoot is where examples/ and the Makefile fragment live.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "examples", "replace", "Makefile")); err != nil {
		t.Fatalf("examples/replace/Makefile not found from the linker package: %v", err)
	}
	return root
}

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s not found: these tests compile and link real objects with gcc and GNU ld (apt-get install gcc make binutils): %v", name, err)
	}
}

func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	requireTool(t, name)
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// recipeFlags asks the Makefile fragment for its compiler flags, so the
// tests compile exactly what the documented recipe compiles.
func recipeFlags(t *testing.T, kconfig string) []string {
	t.Helper()
	args := []string{"-s", "--no-print-directory", "-f", filepath.Join(repoRoot(t), "examples", "replace", "Makefile"), "replace-flags"}
	if kconfig != "" {
		args = append(args, "REPLACE_KCONFIG="+kconfig)
	}
	flags := strings.Fields(run(t, t.TempDir(), "make", args...))
	if len(flags) < 10 {
		t.Fatalf("make replace-flags printed too few flags: %q", flags)
	}
	return flags
}

// compileC compiles src with the recipe's flags plus extra ones and returns the object path.
func compileC(t *testing.T, src string, extra ...string) string {
	t.Helper()
	return compileWith(t, src, append(recipeFlags(t, ""), extra...)...)
}

// compileWith compiles src with exactly the given flags.
func compileWith(t *testing.T, src string, flags ...string) string {
	t.Helper()
	dir := t.TempDir()
	c := filepath.Join(dir, "fixture.c")
	if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	obj := filepath.Join(dir, "fixture.o")
	run(t, dir, "gcc", append(append([]string{}, flags...), "-c", c, "-o", obj)...)
	return obj
}

func mustLoad(t *testing.T, path string) *Object {
	t.Helper()
	o, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return o
}

func mustLink(t *testing.T, o *Object, entry string) *Image {
	t.Helper()
	img, err := o.Link(entry, testLayout, testResolver)
	if err != nil {
		t.Fatalf("Link: %v", err)
	}
	return img
}

// ldReference links the same object with GNU ld, every section at the
// address our linker chose and every import defined at its kallsyms
// address, and returns ld's bytes for each placed section. It is an
// independent implementation of the same relocation arithmetic.
func ldReference(t *testing.T, objPath string, img *Image) map[string][]byte {
	t.Helper()
	var script strings.Builder
	script.WriteString("SECTIONS {\n")
	for i, s := range img.Map.Sections {
		if s.Size == 0 {
			continue // ld drops empty output sections
		}
		fmt.Fprintf(&script, "  .out%d %#x : { *(%s) }\n", i, s.Addr, s.Name)
	}
	script.WriteString("  /DISCARD/ : { *(.eh_frame) *(.note.gnu.property) *(.comment) *(.note.GNU-stack) }\n}\n")
	dir := t.TempDir()
	lds := filepath.Join(dir, "map.ld")
	if err := os.WriteFile(lds, []byte(script.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "ref.elf")
	args := []string{"-static", "--no-relax", "-z", "noexecstack", "-e", img.Map.Entry, "-T", lds, "-o", out}
	for _, imp := range img.Map.Imports {
		args = append(args, fmt.Sprintf("--defsym=%s=%#x", imp.Name, imp.Addr))
	}
	run(t, dir, "ld", append(args, objPath)...)

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ref := make(map[string][]byte)
	for i, s := range img.Map.Sections {
		if s.Size == 0 {
			continue
		}
		sec := f.Section(fmt.Sprintf(".out%d", i))
		if sec == nil {
			t.Fatalf("ld output has no section for %s:\n%s", s.Name, script.String())
		}
		if sec.Addr != s.Addr {
			t.Fatalf("ld put %s at %#x, we put it at %#x", s.Name, sec.Addr, s.Addr)
		}
		if sec.Type == elf.SHT_NOBITS {
			ref[s.Name] = make([]byte, sec.Size)
			continue
		}
		data, err := sec.Data()
		if err != nil {
			t.Fatal(err)
		}
		ref[s.Name] = data
	}
	return ref
}

// sectionBytes returns the image bytes of one placed section.
func sectionBytes(t *testing.T, img *Image, name string) []byte {
	t.Helper()
	for _, s := range img.Map.Sections {
		if s.Name != name {
			continue
		}
		base, buf := img.Map.DataBase, img.Data
		if s.Area == "text" {
			base, buf = img.Map.TextBase, img.Text
		}
		return buf[s.Addr-base : s.Addr-base+s.Size]
	}
	t.Fatalf("section %s not placed; placed: %+v", name, img.Map.Sections)
	return nil
}

// compareWithLD checks every placed section byte for byte against GNU ld.
func compareWithLD(t *testing.T, objPath string, img *Image) {
	t.Helper()
	ref := ldReference(t, objPath, img)
	names := make([]string, 0, len(ref))
	for n := range ref {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		got := sectionBytes(t, img, n)
		if !bytes.Equal(got, ref[n]) {
			t.Errorf("section %s differs from GNU ld's link:\n ours % x\n ld   % x", n, got, ref[n])
		}
	}
}

// symbolAddr finds a defined symbol in the link map.
func symbolAddr(t *testing.T, img *Image, name string) uint64 {
	t.Helper()
	for _, s := range img.Map.Symbols {
		if s.Name == name {
			return s.Addr
		}
	}
	t.Fatalf("symbol %s not in link map", name)
	return 0
}

// cString reads a NUL-terminated string from the data image at a guest address.
func cString(t *testing.T, img *Image, addr uint64) string {
	t.Helper()
	if addr < img.Map.DataBase || addr >= img.Map.DataBase+uint64(len(img.Data)) {
		t.Fatalf("address %#x is outside the data image [%#x, %#x)", addr, img.Map.DataBase, img.Map.DataBase+uint64(len(img.Data)))
	}
	b := img.Data[addr-img.Map.DataBase:]
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return string(b[:i])
	}
	t.Fatalf("no NUL after %#x", addr)
	return ""
}
