package linker

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/arch/x86/x86asm"
)

var endbr64 = []byte{0xf3, 0x0f, 0x1e, 0xfa}

// decoded is one instruction of linked text with its guest address.
type decoded struct {
	addr uint64
	inst x86asm.Inst
}

// disassemble decodes a function in the linked text. x86asm decodes endbr64
// as a lone prefix, so it is stepped over by hand.
func disassemble(t *testing.T, img *Image, start, size uint64) []decoded {
	t.Helper()
	var out []decoded
	code := img.Text[start-img.Map.TextBase : start-img.Map.TextBase+size]
	for off := 0; off < len(code); {
		if bytes.HasPrefix(code[off:], endbr64) {
			off += len(endbr64)
			continue
		}
		inst, err := x86asm.Decode(code[off:], 64)
		if err != nil {
			t.Fatalf("decoding at %#x: %v (% x)", start+uint64(off), err, code[off:min(off+8, len(code))])
		}
		out = append(out, decoded{start + uint64(off), inst})
		off += inst.Len
	}
	return out
}

// branchTarget gives the destination of a rel32 call/jmp.
func branchTarget(d decoded) (uint64, bool) {
	if rel, ok := d.inst.Args[0].(x86asm.Rel); ok {
		return d.addr + uint64(d.inst.Len) + uint64(int64(rel)), true
	}
	return 0, false
}

func buildExample(t *testing.T, kconfig string) string {
	t.Helper()
	out := t.TempDir()
	args := []string{"-s", "--no-print-directory", "-f", filepath.Join(repoRoot(t), "examples", "replace", "Makefile"), "replace-example", "REPLACE_OUT=" + out}
	if kconfig != "" {
		args = append(args, "REPLACE_KCONFIG="+kconfig)
	}
	run(t, out, "make", args...)
	obj := filepath.Join(out, "version_proc_show.o")
	if _, err := os.Stat(obj); err != nil {
		t.Fatalf("make replace-example did not produce %s: %v", obj, err)
	}
	return obj
}

// The documented example, built by its Makefile, links against guest
// symbols: the call reaches seq_printf, the loads give init_uts_ns fields
// and the format string, and every byte agrees with GNU ld.
func TestExampleVersionProcShow(t *testing.T) {
	obj := buildExample(t, "")
	o := mustLoad(t, obj)
	wantUndef := []string{"__x86_return_thunk", "init_uts_ns", "seq_printf"}
	if got := o.Undefined(); !reflect.DeepEqual(got, wantUndef) {
		t.Fatalf("Undefined() = %v, want %v", got, wantUndef)
	}
	img := mustLink(t, o, "hvpatch_version_proc_show")
	if img.Entry != testTextBase || img.Map.EntryAddr != img.Entry {
		t.Errorf("entry %#x (map %#x), want %#x: the only function starts the text", img.Entry, img.Map.EntryAddr, uint64(testTextBase))
	}
	if !bytes.HasPrefix(img.Text, endbr64) {
		t.Errorf("entry does not start with endbr64 although the default recipe builds for IBT: % x", img.Text[:8])
	}
	compareWithLD(t, obj, img)

	src, err := os.ReadFile(filepath.Join(repoRoot(t), "examples", "replace", "version_proc_show.c"))
	if err != nil {
		t.Fatal(err)
	}
	var calls, jumps, imms []uint64
	for _, d := range disassemble(t, img, img.Entry, uint64(len(img.Text))) {
		switch d.inst.Op {
		case x86asm.CALL:
			if a, ok := branchTarget(d); ok {
				calls = append(calls, a)
			}
		case x86asm.JMP:
			if a, ok := branchTarget(d); ok {
				jumps = append(jumps, a)
			}
		case x86asm.MOV:
			if imm, ok := d.inst.Args[1].(x86asm.Imm); ok {
				imms = append(imms, uint64(int64(imm)))
			}
		}
	}
	if !reflect.DeepEqual(calls, []uint64{testKallsyms["seq_printf"]}) {
		t.Errorf("calls go to %#x, want seq_printf at %#x", calls, testKallsyms["seq_printf"])
	}
	if !reflect.DeepEqual(jumps, []uint64{testKallsyms["__x86_return_thunk"]}) {
		t.Errorf("jumps go to %#x, want the return thunk at %#x", jumps, testKallsyms["__x86_return_thunk"])
	}
	uts := testKallsyms["init_uts_ns"]
	var sawSysname, sawRelease, sawFormat bool
	for _, v := range imms {
		switch {
		case v == uts:
			sawSysname = true
		case v == uts+2*65: // release follows sysname and nodename, 65 bytes each
			sawRelease = true
		case v >= testDataBase && v < testDataBase+uint64(len(img.Data)):
			s := cString(t, img, v)
			sawFormat = strings.Contains(s, "replaced by hvpatch") && strings.Contains(string(src), strings.TrimSuffix(s, "\n"))
		}
	}
	if !sawSysname || !sawRelease || !sawFormat {
		t.Errorf("immediates %#x: sysname %v, release %v, format string from the source %v", imms, sawSysname, sawRelease, sawFormat)
	}

	var buf bytes.Buffer
	img.Map.Format(&buf)
	for _, want := range []string{"hvpatch_version_proc_show", "0xffffffffbe400000", "seq_printf", "R_X86_64_PLT32", "R_X86_64_32S", ".rodata.str1.8", "init_uts_ns+130"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("link map lacks %q:\n%s", want, buf.String())
		}
	}
}

// The Makefile reads the guest's config: IBT and thunks follow it.
func TestRecipeFollowsKernelConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The options as the Debian 6.1 and 6.12 configs spell them.
	k61 := write("config-6.1", "CONFIG_RETPOLINE=y\nCONFIG_RETHUNK=y\nCONFIG_SLS=y\n# CONFIG_X86_KERNEL_IBT is not set\n")
	k612 := write("config-6.12", "CONFIG_MITIGATION_RETPOLINE=y\nCONFIG_MITIGATION_RETHUNK=y\nCONFIG_MITIGATION_SLS=y\nCONFIG_X86_KERNEL_IBT=y\n")
	bare := write("config-none", "# CONFIG_RETPOLINE is not set\n")

	has := func(flags []string, f string) bool {
		for _, x := range flags {
			if x == f {
				return true
			}
		}
		return false
	}
	for _, c := range []struct {
		config     string
		ibt, thunk bool
	}{{k61, false, true}, {k612, true, true}, {bare, false, false}} {
		flags := recipeFlags(t, c.config)
		if has(flags, "-fcf-protection=branch") != c.ibt || has(flags, "-fcf-protection=none") == c.ibt {
			t.Errorf("%s: IBT flags wrong: %v", filepath.Base(c.config), flags)
		}
		for _, f := range []string{"-mfunction-return=thunk-extern", "-mindirect-branch=thunk-extern", "-mharden-sls=all"} {
			if has(flags, f) != c.thunk {
				t.Errorf("%s: %s present=%v, want %v", filepath.Base(c.config), f, has(flags, f), c.thunk)
			}
		}
		o := mustLoad(t, buildExample(t, c.config))
		img := mustLink(t, o, "hvpatch_version_proc_show")
		if bytes.HasPrefix(img.Text, endbr64) != c.ibt {
			t.Errorf("%s: endbr64 at entry = %v, want %v", filepath.Base(c.config), !c.ibt, c.ibt)
		}
		if usesThunk := strings.Contains(strings.Join(o.Undefined(), " "), ReturnThunk); usesThunk != c.thunk {
			t.Errorf("%s: undefined %v, return thunk expected %v", filepath.Base(c.config), o.Undefined(), c.thunk)
		}
	}
}

const richFixture = `
struct seq_file;
extern void seq_printf(struct seq_file *m, const char *fmt, ...);
extern void *memset(void *s, int c, unsigned long n);

static const char greeting[] = "hello from the code area";
const char *greeting_ptr = greeting;                 /* .data: R_X86_64_64 to .rodata */
const char *tail_ptr = &greeting[6];                 /* the same with an addend */
int counter = 41;                                    /* .data */
static char scratch[200] __attribute__((aligned(64)));  /* .bss, 64-aligned */
int tentative;                                       /* COMMON with -fcommon */
void (*hook)(void) __attribute__((nocommon));        /* indirect call through a thunk */

/* R_X86_64_PC64 and R_X86_64_32 from data directives; small_abs is a
   kallsyms entry with a small value. */
asm(".pushsection .data.misc,\"aw\"\n.balign 8\n"
    ".globl pc64_slot\npc64_slot: .quad seq_printf - .\n"
    ".globl abs32_slot\nabs32_slot: .long small_abs\n.popsection\n");

static __attribute__((noinline)) int helper(int x)
{
	return x * 3 + counter;
}

int entry_fn(struct seq_file *m)
{
	memset(scratch, 'x', sizeof(scratch) - 1);
	counter++;
	tentative += helper(counter);
	if (hook)
		hook();
	seq_printf(m, "%s %s %d\n", greeting_ptr, scratch, tentative);
	return helper(tentative);
}
`

// An object with rodata, data, bss, COMMON, a static helper, an indirect
// call and every supported relocation type links exactly as GNU ld links it.
func TestRichObjectMatchesGNULD(t *testing.T) {
	obj := compileC(t, richFixture, "-fcommon")
	o := mustLoad(t, obj)
	img := mustLink(t, o, "entry_fn")
	compareWithLD(t, obj, img)

	types := map[string]bool{}
	for _, r := range img.Map.Relocations {
		types[r.Type] = true
	}
	for _, want := range []string{"R_X86_64_PC32", "R_X86_64_PLT32", "R_X86_64_32S", "R_X86_64_64", "R_X86_64_PC64", "R_X86_64_32"} {
		if !types[want] {
			t.Errorf("fixture produced no %s relocation; got %v", want, types)
		}
	}
	for _, s := range img.Map.Sections {
		if s.Addr%s.Align != 0 {
			t.Errorf("section %s at %#x is not aligned to %d", s.Name, s.Addr, s.Align)
		}
		if s.ZeroFilled && !bytes.Equal(sectionBytes(t, img, s.Name), make([]byte, s.Size)) {
			t.Errorf("zero-filled section %s is not zero", s.Name)
		}
	}
	if a := symbolAddr(t, img, "scratch"); a%64 != 0 {
		t.Errorf("scratch at %#x, want 64-byte alignment", a)
	}
	// bss and COMMON follow all initialised data.
	var lastInit, firstZero uint64 = 0, ^uint64(0)
	for _, s := range img.Map.Sections {
		if s.Area != "data" {
			continue
		}
		if s.ZeroFilled {
			firstZero = min(firstZero, s.Addr)
		} else {
			lastInit = max(lastInit, s.Addr+s.Size)
		}
	}
	if firstZero < lastInit {
		t.Errorf("zero-filled data at %#x precedes initialised data ending at %#x", firstZero, lastInit)
	}

	// Independent of ld: the pointer in .data points at the string.
	ptr := binary.LittleEndian.Uint64(img.Data[symbolAddr(t, img, "greeting_ptr")-testDataBase:])
	if got := cString(t, img, ptr); got != "hello from the code area" {
		t.Errorf("greeting_ptr -> %#x = %q", ptr, got)
	}
	tail := binary.LittleEndian.Uint64(img.Data[symbolAddr(t, img, "tail_ptr")-testDataBase:])
	if got := cString(t, img, tail); got != "from the code area" {
		t.Errorf("tail_ptr -> %#x = %q", tail, got)
	}
	pcSlot := symbolAddr(t, img, "pc64_slot")
	if d := int64(binary.LittleEndian.Uint64(img.Data[pcSlot-testDataBase:])); uint64(int64(pcSlot)+d) != testKallsyms["seq_printf"] {
		t.Errorf("pc64_slot + %d does not reach seq_printf", d)
	}
	if v := binary.LittleEndian.Uint32(img.Data[symbolAddr(t, img, "abs32_slot")-testDataBase:]); v != 0x1234 {
		t.Errorf("abs32_slot = %#x, want 0x1234", v)
	}

	// Calls: to the static helper inside the text, to kernel functions by kallsyms address.
	entry := symbolAddr(t, img, "entry_fn")
	if entry != img.Entry {
		t.Errorf("Entry %#x, map says entry_fn at %#x", img.Entry, entry)
	}
	helperAddr := symbolAddr(t, img, "helper")
	want := map[uint64]string{helperAddr: "helper", testKallsyms["memset"]: "memset", testKallsyms["seq_printf"]: "seq_printf"}
	seen := map[string]bool{}
	for _, d := range disassemble(t, img, entry, uint64(len(img.Text))-(entry-testTextBase)) {
		if d.inst.Op != x86asm.CALL {
			continue
		}
		if a, ok := branchTarget(d); ok {
			if name, ok := want[a]; ok {
				seen[name] = true
			} else if strings.HasPrefix(reverseLookup(a), "__x86_indirect_thunk_") {
				seen["indirect thunk"] = true
			} else {
				t.Errorf("call at %#x goes to %#x, which is nothing known", d.addr, a)
			}
		}
	}
	if len(seen) != len(want)+1 {
		t.Errorf("calls seen %v, want all of %v and an indirect thunk", seen, want)
	}
	tw, dw := o.Size()
	if tw != uint64(len(img.Text)) || dw != uint64(len(img.Data)) {
		t.Errorf("Size() = %#x, %#x; image is %#x, %#x", tw, dw, len(img.Text), len(img.Data))
	}
}

func reverseLookup(a uint64) string {
	for n, v := range testKallsyms {
		if v == a {
			return n
		}
	}
	return ""
}

// A -fpic object uses the GOT: refused, naming the relocation type and where.
func TestUnsupportedRelocationRefused(t *testing.T) {
	obj := compileWith(t, "extern int kernel_var;\nint get(void) { return kernel_var; }\n", "-O2", "-fpic", "-mcmodel=small")
	_, err := Load(obj)
	var re *RelocError
	if !errors.As(err, &re) {
		t.Fatalf("Load error %v, want a RelocError", err)
	}
	if re.Type != elf.R_X86_64_REX_GOTPCRELX && re.Type != elf.R_X86_64_GOTPCREL {
		t.Errorf("refused type %v, want a GOTPCREL kind", re.Type)
	}
	for _, want := range []string{re.Type.String(), ".text+0x", "kernel_var", "-fno-pic"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// Every missing kernel symbol is named, not just the first.
func TestUnresolvedSymbolsAllListed(t *testing.T) {
	obj := compileC(t, `
extern void printk(const char *, ...);
extern void no_such_kernel_fn(void);
extern int no_such_kernel_var;
int f(void) { printk("x"); no_such_kernel_fn(); return no_such_kernel_var; }
`)
	_, err := mustLoad(t, obj).Link("f", testLayout, testResolver)
	var ue *UnresolvedError
	if !errors.As(err, &ue) {
		t.Fatalf("Link error %v, want an UnresolvedError", err)
	}
	if want := []string{"no_such_kernel_fn", "no_such_kernel_var"}; !reflect.DeepEqual(ue.Names, want) {
		t.Errorf("unresolved %v, want %v", ue.Names, want)
	}
	if !strings.Contains(err.Error(), "no_such_kernel_fn, no_such_kernel_var") {
		t.Errorf("error %q does not list both names", err)
	}
}

// Sections larger than the area are refused, naming the area and the sizes.
func TestSectionTooLarge(t *testing.T) {
	obj := compileC(t, `
static char big[3 * 4096];
char *f(void) { asm volatile(".fill 5000, 1, 0x90"); return big; }
`)
	_, err := mustLoad(t, obj).Link("f", testLayout, testResolver)
	if err == nil {
		t.Fatal("Link succeeded although both areas are too small")
	}
	for _, want := range []string{"text area too small", "data area too small", ".bss (0x3000)", "limit 0x1000"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	var se *SizeError
	if !errors.As(err, &se) || se.Limit != pageSize {
		t.Errorf("error %v carries no SizeError with the limit", err)
	}
}

// A kernel function out of rel32 reach is an error naming the relocation and distance.
func TestFarSymbolOutOfRange(t *testing.T) {
	obj := compileC(t, "extern void far_away(void);\nvoid f(void) { far_away(); }\n")
	_, err := mustLoad(t, obj).Link("f", testLayout, testResolver)
	var re *RelocError
	if !errors.As(err, &re) {
		t.Fatalf("Link error %v, want a RelocError", err)
	}
	if re.Symbol != "far_away" || re.Type != elf.R_X86_64_PLT32 {
		t.Errorf("refused %v against %s, want R_X86_64_PLT32 against far_away", re.Type, re.Symbol)
	}
	for _, want := range []string{"does not fit a signed 32-bit displacement", "GiB", "0xffff888000100000"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// An absolute 32-bit field cannot hold a kernel address.
func TestAbs32Overflow(t *testing.T) {
	obj := compileC(t, `asm(".pushsection .rodata\n.globl tbl\ntbl: .long seq_printf\n.popsection\n");
extern const int tbl; int f(void) { return tbl; }`)
	_, err := mustLoad(t, obj).Link("f", testLayout, testResolver)
	if err == nil || !strings.Contains(err.Error(), "R_X86_64_32 at .rodata+0x0 against seq_printf") || !strings.Contains(err.Error(), "does not fit 32 bits zero-extended") {
		t.Fatalf("error %v, want R_X86_64_32 overflow against seq_printf", err)
	}
}

// Sections the kernel would have to process are refused by name.
func TestRefusedSections(t *testing.T) {
	cases := []struct {
		name, src string
		flags     []string
		section   string
	}{
		{"jump table", `void f(void) { asm(".pushsection __jump_table,\"aw\"\n.quad 0\n.popsection"); }`, nil, "__jump_table"},
		{"alternatives", `void f(void) { asm(".pushsection .altinstructions,\"a\"\n.long 0\n.popsection"); }`, nil, ".altinstructions"},
		{"bug table", `void f(void) { asm(".pushsection __bug_table,\"aw\"\n.long 0\n.popsection"); }`, nil, "__bug_table"},
		{"per-cpu", `__attribute__((section(".data..percpu"))) int pcpu; int f(void) { return pcpu; }`, nil, ".data..percpu"},
		{"constructor", `static int x; static void __attribute__((constructor)) init(void) { x = 1; } int f(void) { return x; }`, nil, ".init_array"},
		{"exception table", `void f(void) { asm("1: nop\n.pushsection __ex_table,\"a\"\n.long 1b - .\n.long 1b - .\n.long 0\n.popsection"); }`, nil, "__ex_table"},
		{"static call trampoline", `void f(void) {} asm(".pushsection .static_call.text,\"ax\"\nret\n.popsection");`, nil, ".static_call.text"},
		{"unknown section", `__attribute__((section(".mystuff"))) int x = 1; int f(void) { return x; }`, nil, ".mystuff"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Load(compileC(t, c.src, c.flags...))
			var se *SectionError
			if !errors.As(err, &se) {
				t.Fatalf("Load error %v, want a SectionError", err)
			}
			if se.Section != c.section || !strings.Contains(err.Error(), "section "+c.section+" refused: ") {
				t.Errorf("error %q, want section %s refused", err, c.section)
			}
		})
	}
}

func TestWeakUndefinedRefused(t *testing.T) {
	obj := compileC(t, "extern void maybe(void) __attribute__((weak));\nvoid f(void) { if (maybe) maybe(); }\n")
	_, err := Load(obj)
	var se *SymbolError
	if !errors.As(err, &se) || se.Symbol != "maybe" || !strings.Contains(err.Error(), "weak undefined") {
		t.Fatalf("Load error %v, want weak undefined symbol maybe refused", err)
	}
}

// gcc's default .eh_frame (and non-alloc sections) are left out and said so.
func TestUnwindTablesIgnored(t *testing.T) {
	obj := compileC(t, "extern void printk(const char *, ...);\nvoid f(void) { printk(\"hi\"); }\n", "-fasynchronous-unwind-tables")
	img := mustLink(t, mustLoad(t, obj), "f")
	ignored := map[string]bool{}
	for _, s := range img.Map.Ignored {
		ignored[s.Name] = true
	}
	if !ignored[".eh_frame"] || !ignored[".comment"] {
		t.Errorf("ignored %v, want .eh_frame and .comment", img.Map.Ignored)
	}
	for _, s := range img.Map.Sections {
		if s.Name == ".eh_frame" {
			t.Errorf(".eh_frame was placed at %#x", s.Addr)
		}
	}
	compareWithLD(t, obj, img)
}

// With PlainReturns every return-thunk jump becomes ret+int3 and the thunk
// need not resolve.
func TestPlainReturns(t *testing.T) {
	o := mustLoad(t, buildExample(t, ""))
	resolve := func(name string) (uint64, bool) {
		if name == ReturnThunk {
			return 0, false
		}
		return testResolver(name)
	}
	img, err := o.LinkWithOptions("hvpatch_version_proc_show", testLayout, resolve, Options{PlainReturns: true})
	if err != nil {
		t.Fatal(err)
	}
	var sites int
	for _, r := range img.Map.Relocations {
		if r.Symbol != ReturnThunk {
			continue
		}
		sites++
		at := r.Addr - 1 - testTextBase
		if got := img.Text[at : at+5]; !bytes.Equal(got, []byte{0xc3, 0xcc, 0xcc, 0xcc, 0xcc}) {
			t.Errorf("return site at %#x is % x, want ret; int3 x4", r.Addr-1, got)
		}
	}
	if sites == 0 {
		t.Fatal("no return-thunk site in the example")
	}
	var rets int
	for _, d := range disassemble(t, img, img.Entry, uint64(len(img.Text))) {
		if d.inst.Op == x86asm.RET {
			rets++
		}
		if a, ok := branchTarget(d); ok && d.inst.Op == x86asm.JMP && a == 0 {
			t.Errorf("jmp at %#x still targets an unresolved thunk", d.addr)
		}
	}
	if rets != sites {
		t.Errorf("%d ret instructions, want %d", rets, sites)
	}
	// Without the option the thunk must resolve.
	if _, err := o.Link("hvpatch_version_proc_show", testLayout, resolve); err == nil || !strings.Contains(err.Error(), ReturnThunk) {
		t.Errorf("Link without PlainReturns and without the thunk: %v", err)
	}
}

func TestLayoutAndEntryErrors(t *testing.T) {
	o := mustLoad(t, compileC(t, "static int n; int f(void) { return ++n; }\n"))
	misaligned := testLayout
	misaligned.TextBase += 2
	if _, err := o.Link("f", misaligned, testResolver); err == nil || !strings.Contains(err.Error(), "text base 0xffffffffbe400002 is not aligned to 16") {
		t.Errorf("misaligned text base: %v", err)
	}
	overlap := testLayout
	overlap.DataBase = testTextBase
	if _, err := o.Link("f", overlap, testResolver); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Errorf("overlapping areas: %v", err)
	}
	if _, err := o.Link("g", testLayout, testResolver); err == nil || !strings.Contains(err.Error(), "symbol g: entry symbol not found") {
		t.Errorf("missing entry: %v", err)
	}
	if _, err := o.Link("n", testLayout, testResolver); err == nil || !strings.Contains(err.Error(), "not in an executable section") {
		t.Errorf("data symbol as entry: %v", err)
	}
}

func TestNotARelocatableObject(t *testing.T) {
	if _, err := LoadBytes([]byte("not an elf")); err == nil || !strings.Contains(err.Error(), "not an ELF file") {
		t.Errorf("garbage: %v", err)
	}
	dir := t.TempDir()
	obj := compileC(t, "void _start(void) { for (;;) ; }\n")
	exe := filepath.Join(dir, "exe")
	run(t, dir, "ld", "-static", "-o", exe, obj)
	if _, err := Load(exe); err == nil || !strings.Contains(err.Error(), "want ET_REL") {
		t.Errorf("executable: %v", err)
	}
}

// One section per function and per object: cross-section references link
// as GNU ld links them.
func TestFunctionSectionsMatchGNULD(t *testing.T) {
	obj := compileC(t, richFixture, "-ffunction-sections", "-fdata-sections")
	img := mustLink(t, mustLoad(t, obj), "entry_fn")
	var text int
	for _, s := range img.Map.Sections {
		if s.Area == "text" {
			text++
		}
	}
	if text < 2 {
		t.Fatalf("expected several text sections with -ffunction-sections, got %+v", img.Map.Sections)
	}
	compareWithLD(t, obj, img)
	if got := cString(t, img, binary.LittleEndian.Uint64(img.Data[symbolAddr(t, img, "greeting_ptr")-testDataBase:])); got != "hello from the code area" {
		t.Errorf("greeting_ptr -> %q", got)
	}
}
