package ksource

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/symbols"
)

// guestKernel returns the test guest's release of a series and its vmlinux path.
func guestKernel(t *testing.T, series string) (release, vmlinux string) {
	t.Helper()
	cache := filepath.Join("..", ".cache", "guest")
	list, err := os.ReadFile(filepath.Join(cache, "kernels.txt"))
	if err != nil {
		t.Fatalf("test guest kernels (build them first): %v", err)
	}
	for l := range strings.Lines(string(list)) {
		if f := strings.Fields(l); len(f) == 2 && f[0] == series {
			return f[1], filepath.Join(cache, "kernels", f[1], "vmlinux")
		}
	}
	t.Skipf("no %s kernel in %s/kernels.txt", series, cache)
	return "", ""
}

// bannerOf finds linux_banner in a kernel image.
func bannerOf(t *testing.T, img []byte, release string) string {
	t.Helper()
	i := bytes.Index(img, []byte("Linux version "+release+" ("))
	if i < 0 {
		t.Fatalf("no banner of %s in vmlinux", release)
	}
	end := bytes.IndexAny(img[i:], "\x00\n")
	return string(img[i : i+end])
}

func TestCompileMatchesGuestKernel(t *testing.T) {
	if testing.Short() {
		t.Skip("downloads and prepares a kernel tree (minutes when cold)")
	}
	t.Run("6.1", func(t *testing.T) { testGuestKernel(t, "6.1") })
	if os.Getenv("KSOURCE_TEST_6_12") != "" {
		t.Run("6.12", func(t *testing.T) { testGuestKernel(t, "6.12") })
	}
}

func testGuestKernel(t *testing.T, series string) {
	ctx := context.Background()
	release, vmlinux := guestKernel(t, series)
	raw, err := os.ReadFile(vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ParseBanner(bannerOf(t, raw, release))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest build: %+v", b)

	start := time.Now()
	_, err = Prepare(ctx, b, Options{Progress: func(m string) { t.Log(m) }})
	if err != nil {
		t.Fatal(err)
	}
	first := time.Since(start)
	start = time.Now()
	tree, err := Prepare(ctx, b, Options{})
	if err != nil {
		t.Fatal(err)
	}
	warm := time.Since(start)
	t.Logf("Prepare: first call %v, second (warm) %v; packages %q", first.Round(time.Millisecond), warm.Round(time.Millisecond), tree.Packages)
	for _, s := range tree.Steps {
		t.Logf("  step %-9s %8v cached=%v %s", s.Name, s.Duration.Round(time.Millisecond), s.Cached, s.Detail)
	}
	if len(tree.Steps) == 0 || !tree.Steps[0].Cached {
		t.Errorf("second Prepare did not come from the cache: %+v", tree.Steps)
	}
	if err := tree.CheckCompiler(b.Compiler); err != nil {
		t.Fatal(err)
	}
	if err := tree.CheckCompiler("gcc-13 (Debian 13.2.0-25) 13.2.0"); err == nil || !strings.Contains(err.Error(), "gcc-13") {
		t.Errorf("CheckCompiler accepted another compiler: %v", err)
	}

	img, base, err := symbols.VmlinuxImage(vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	tab, err := symbols.DecodeKallsyms(img, base)
	if err != nil {
		t.Fatal(err)
	}

	for _, rel := range []string{"fs/proc/version.c", "kernel/sys.c", "fs/proc/base.c"} {
		orig, _ := tree.ReadFile(rel)
		start := time.Now()
		obj, err := tree.Compile(ctx, rel, nil, Normal)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("Compile %s (warm tree): %v", rel, time.Since(start).Round(time.Millisecond))
		matched, absent, bad := compareFunctions(t, obj, tab, img, base)
		t.Logf("%s: %d functions byte-identical to the guest's vmlinux, %d not in its kallsyms", rel, matched, absent)
		if bad > 0 || matched == 0 || absent > matched/4 {
			t.Errorf("%s: %d functions differ, %d match, %d not found", rel, bad, matched, absent)
		}
		if now, _ := tree.ReadFile(rel); !bytes.Equal(now, orig) {
			t.Errorf("%s changed in the tree:\n%s\n---\n%s", rel, orig, now)
		}
		if _, err := os.Stat(filepath.Join(tree.Dir, strings.TrimSuffix(rel, ".c")+".o")); err == nil {
			t.Errorf("%s: object left in the tree", rel)
		}
	}

	// Replaced content compiles into a different object and leaves the tree as it was.
	rel := "fs/proc/version.c"
	orig, _ := tree.ReadFile(rel)
	fi, _ := os.Stat(filepath.Join(tree.Dir, rel))
	changed := append(bytes.Clone(orig), "\nint hvpatch_extra(void) { return 1; }\n"...)
	normal, _ := tree.Compile(ctx, rel, nil, Normal)
	patched, err := tree.Compile(ctx, rel, changed, Normal)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(normal, patched) {
		t.Error("replaced content gave the same object")
	}
	_, err = tree.Compile(ctx, rel, []byte("int broken = ;\n"), Normal)
	if err == nil || !strings.Contains(err.Error(), "error:") {
		t.Errorf("a broken file compiled, or the error lacks the compiler's output: %v", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = tree.Compile(cctx, "kernel/sys.c", []byte("int cancelled;\n"), Normal)
	cancel()
	t.Logf("cancelled compile: %v", err)
	if now, _ := tree.ReadFile(rel); !bytes.Equal(now, orig) {
		t.Errorf("%s not restored", rel)
	}
	if fi2, _ := os.Stat(filepath.Join(tree.Dir, rel)); !fi2.ModTime().Equal(fi.ModTime()) {
		t.Errorf("%s: modification time not restored", rel)
	}
	sysOrig, _ := tree.ReadFile("kernel/sys.c")
	if bytes.Contains(sysOrig, []byte("int cancelled;")) {
		t.Error("kernel/sys.c not restored after cancellation")
	}

	// Function sections: one section per function, and objtool still runs
	// (its annotations are there).
	fs, err := tree.Compile(ctx, rel, nil, FunctionSections)
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(fs))
	if err != nil {
		t.Fatal(err)
	}
	if f.Section(".text.version_proc_show") == nil {
		t.Error("FunctionSections: no .text.version_proc_show section")
	}
	if f.Section("__mcount_loc") == nil && f.Section(".discard.retpoline_safe") == nil && f.Section(".orc_unwind") == nil {
		t.Error("FunctionSections: no sign of objtool (no __mcount_loc / ORC sections)")
	}
}

// compareFunctions compares the code of every function of an object with
// the function of the same name in the kernel image. Bytes that relocations
// fill in are not compared; an entry's "call __fentry__" may be the 5-byte
// NOP ftrace leaves in vmlinux.
func compareFunctions(t *testing.T, obj []byte, tab *symbols.Table, img []byte, base uint64) (matched, absent, bad int) {
	f, err := elf.NewFile(bytes.NewReader(obj))
	if err != nil {
		t.Fatal(err)
	}
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	masks := map[int][]bool{}
	fentry := map[int]map[uint64]bool{}
	maskOf := func(si int) []bool {
		if m, ok := masks[si]; ok {
			return m
		}
		sec := f.Sections[si]
		m := make([]bool, sec.Size)
		fentry[si] = map[uint64]bool{}
		for _, rs := range f.Sections {
			if rs.Type != elf.SHT_RELA || rs.Info != uint32(si) {
				continue
			}
			data, _ := rs.Data()
			for i := 0; i+24 <= len(data); i += 24 {
				off := binary.LittleEndian.Uint64(data[i:])
				info := binary.LittleEndian.Uint64(data[i+8:])
				n := uint64(4)
				switch elf.R_X86_64(info & 0xffffffff) {
				case elf.R_X86_64_64, elf.R_X86_64_PC64:
					n = 8
				case elf.R_X86_64_NONE:
					n = 0
				}
				for j := off; j < off+n && j < uint64(len(m)); j++ {
					m[j] = true
				}
				if s := int(info >> 32); s > 0 && s <= len(syms) && syms[s-1].Name == "__fentry__" {
					fentry[si][off] = true
				}
			}
		}
		masks[si] = m
		return m
	}
	nop5 := []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
	for _, s := range syms {
		if elf.ST_TYPE(s.Info) != elf.STT_FUNC || s.Size == 0 || int(s.Section) >= len(f.Sections) || s.Section == elf.SHN_UNDEF {
			continue
		}
		si := int(s.Section)
		data, err := f.Sections[si].Data()
		if err != nil || s.Value+s.Size > uint64(len(data)) {
			continue
		}
		code, mask := bytes.Clone(data[s.Value:s.Value+s.Size]), maskOf(si)[s.Value:s.Value+s.Size]
		var found, ok bool
		var diff string
		for _, k := range tab.Lookup(s.Name) {
			if !symbols.IsText(k.Type) || k.Addr < base || k.Addr-base+s.Size > uint64(len(img)) {
				continue
			}
			found = true
			got := img[k.Addr-base : k.Addr-base+s.Size]
			// The fentry call is first, or second after endbr64 (IBT).
			for _, o := range []uint64{1, 5} {
				if fentry[si][s.Value+o] && len(code) >= int(o)+4 && code[o-1] == 0xe8 && bytes.Equal(got[o-1:o+4], nop5) {
					copy(code[o-1:o+4], nop5)
				}
			}
			d := firstDiff(code, got, mask, 0)
			if d < 0 {
				ok = true
				break
			}
			diff = fmt.Sprintf("at +%#x: object % x, vmlinux % x", d, code[d:min(d+8, len(code))], got[d:min(d+8, len(got))])
		}
		switch {
		case ok:
			matched++
		case !found || elf.ST_BIND(s.Info) == elf.STB_WEAK:
			// Not in the image, or a weak default another file
			// overrides (kallsyms then names the strong one).
			absent++
		default:
			bad++
			t.Errorf("function %s (%d bytes) differs from vmlinux %s", s.Name, s.Size, diff)
		}
	}
	return matched, absent, bad
}

// firstDiff is the first offset from start where a and b differ outside
// masked bytes, or -1.
func firstDiff(a, b []byte, mask []bool, start int) int {
	for i := start; i < len(a); i++ {
		if !mask[i] && a[i] != b[i] {
			return i
		}
	}
	return -1
}
