package symbols

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// A C file with every kind of symbol nm distinguishes in a kernel: global
// and static text, data, read-only data, bss, weak functions and objects,
// a per-CPU-style section, an absolute symbol.
const elfTestSource = `
int global_data = 1;
__attribute__((used)) static int local_data = 2;
const int global_ro = 3;
__attribute__((used)) static const int local_ro = 4;
int global_bss;
__attribute__((used)) static int local_bss;
__attribute__((weak)) int weak_obj = 5;
__attribute__((section(".data..percpu"))) int percpu_var = 6;
static int helper(int x) { return x + local_data + local_ro + local_bss; }
int global_fn(int x) { return helper(x) + global_bss; }
__attribute__((weak)) int weak_fn(void) { return 7; }
__attribute__((section(".init.text"))) int init_fn(void) { return 8; }
asm(".globl abs_sym\n.set abs_sym, 0x1234\n");
`

func buildObject(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "syms.c")
	obj := filepath.Join(dir, "syms.o")
	if err := os.WriteFile(src, []byte(elfTestSource), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("gcc", "-c", "-O0", "-fno-common", "-o", obj, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc -c (needed for the ELF loader test): %v\n%s", err, out)
	}
	return obj
}

// nmSymbols runs nm on path: the reference LoadVmlinux must agree with.
func nmSymbols(t *testing.T, path string) map[string]Symbol {
	t.Helper()
	out, err := exec.Command("nm", path).Output()
	if err != nil {
		t.Fatalf("nm %s: %v", path, err)
	}
	syms := map[string]Symbol{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue // undefined symbols have no address column
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			t.Fatalf("nm line %q: %v", line, err)
		}
		syms[f[2]] = Symbol{Name: f[2], Addr: a, Type: f[1][0]}
	}
	return syms
}

func TestLoadVmlinuxMatchesNm(t *testing.T) {
	obj := buildObject(t)
	want := nmSymbols(t, obj)
	for _, name := range []string{"global_data", "local_data", "global_ro", "global_bss", "local_bss", "weak_obj", "helper", "global_fn", "weak_fn", "init_fn", "abs_sym", "percpu_var"} {
		if _, ok := want[name]; !ok {
			t.Fatalf("nm does not list %s; the fixture is not what this test expects", name)
		}
	}
	const slide = 0x1000000
	tab, err := LoadVmlinux(obj, slide)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Symbol{}
	for _, s := range tab.All() {
		got[s.Name] = s
	}
	if len(got) != len(want) {
		t.Errorf("LoadVmlinux found %d symbols, nm lists %d", len(got), len(want))
	}
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("%s (nm %c) missing", name, w.Type)
			continue
		}
		// Absolute symbols stay put; everything else moves (a relocatable
		// object has no zero-based per-CPU segment).
		wantAddr := w.Addr + slide
		if w.Type == 'A' || w.Type == 'a' {
			wantAddr = w.Addr
		}
		if g.Type != w.Type || g.Addr != wantAddr {
			t.Errorf("%s: got %c %#x, nm says %c %#x (+slide %#x)", name, g.Type, g.Addr, w.Type, w.Addr, wantAddr)
		}
	}
	// Static and global letters are what a kernel table shows.
	for name, typ := range map[string]byte{"helper": 't', "global_fn": 'T', "local_data": 'd', "global_bss": 'B', "global_ro": 'R', "weak_fn": 'W', "weak_obj": 'V', "abs_sym": 'A'} {
		if got[name].Type != typ {
			t.Errorf("%s type %c, want %c", name, got[name].Type, typ)
		}
	}
}

func TestLoadVmlinuxStripped(t *testing.T) {
	obj := buildObject(t)
	stripped := obj + ".stripped"
	if out, err := exec.Command("objcopy", "--strip-all", obj, stripped).CombinedOutput(); err != nil {
		t.Fatalf("objcopy --strip-all: %v\n%s", err, out)
	}
	_, err := LoadVmlinux(stripped, 0)
	if err == nil || !strings.Contains(err.Error(), "stripped") || !strings.Contains(err.Error(), stripped) {
		t.Errorf("error %v, want one naming the file and saying it is stripped", err)
	}
	_, err = LoadVmlinux(filepath.Join(t.TempDir(), "missing"), 0)
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing file: error %v", err)
	}
}

// A kernel-like executable: text at 0xffffffff81000000 and a per-CPU section
// linked at 0 with its own zero-address segment, as x86-64 vmlinux has.
const kernelLikeSource = `
__attribute__((section(".data..percpu"))) int percpu_var = 6;
__attribute__((section(".data..percpu"))) int percpu_var2 = 7;
int global_data = 0x11223344;
int global_fn(int x) { return x + percpu_var + global_data; }
`

const kernelLikeScript = `
ENTRY(global_fn)
SECTIONS {
  . = 0xffffffff81000000;
  _text = .;
  .text : { *(.text) }
  . = ALIGN(4096);
  .data : { *(.data) }
  .data..percpu 0 : AT(ADDR(.data) + SIZEOF(.data)) { __per_cpu_start = .; *(.data..percpu) __per_cpu_end = .; }
  . = ADDR(.data) + SIZEOF(.data) + SIZEOF(.data..percpu);
  . = ALIGN(4096);
  .bss : { *(.bss) }
  _end = .;
  /DISCARD/ : { *(.note.GNU-stack) *(.comment) *(.eh_frame) }
}
`

func buildKernelLike(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for name, text := range map[string]string{"k.c": kernelLikeSource, "k.lds": kernelLikeScript} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, cmd := range [][]string{
		{"gcc", "-c", "-O0", "-fno-pic", "-mcmodel=kernel", "-o", "k.o", "k.c"},
		{"ld", "-T", "k.lds", "-o", "k.elf", "k.o"},
	} {
		c := exec.Command(cmd[0], cmd[1:]...)
		c.Dir = dir
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", cmd, err, out)
		}
	}
	return filepath.Join(dir, "k.elf")
}

func TestLoadVmlinuxPerCPUNotSlid(t *testing.T) {
	elfPath := buildKernelLike(t)
	want := nmSymbols(t, elfPath)
	const slide = 0x2c400000
	tab, err := LoadVmlinux(elfPath, slide)
	if err != nil {
		t.Fatal(err)
	}
	if tab.Len() != len(want) {
		t.Errorf("%d symbols, nm lists %d", tab.Len(), len(want))
	}
	for name, w := range want {
		perCPU := strings.HasPrefix(name, "percpu_") || strings.HasPrefix(name, "__per_cpu_")
		wantAddr := w.Addr + slide
		if perCPU {
			if w.Addr > 0x100 {
				t.Fatalf("fixture: nm puts %s at %#x, not in a zero-based per-CPU section", name, w.Addr)
			}
			wantAddr = w.Addr
		}
		got := tab.Lookup(name)
		if len(got) != 1 || got[0].Addr != wantAddr || got[0].Type != w.Type {
			t.Errorf("%s: got %+v, want %c %#x", name, got, w.Type, wantAddr)
		}
	}

	img, base, err := VmlinuxImage(elfPath)
	if err != nil {
		t.Fatal(err)
	}
	if base != want["_text"].Addr {
		t.Errorf("image base %#x, want _text %#x", base, want["_text"].Addr)
	}
	// The per-CPU segment (virtual address 0) is not in the image; the
	// data segment is, at its virtual address.
	off := want["global_data"].Addr - base
	if uint64(len(img)) < off+4 || !bytes.Equal(img[off:off+4], []byte{0x44, 0x33, 0x22, 0x11}) {
		t.Errorf("global_data not at its place in the %d-byte image", len(img))
	}
	if uint64(len(img)) > 0x2000 {
		t.Errorf("image is %#x bytes: the zero-address segment was laid out too", len(img))
	}
}
