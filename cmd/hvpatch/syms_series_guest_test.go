package main

import (
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// TestSymsEverySeries: on every Debian series (kernels.txt and the extra
// kernels), with modules of the kernel's own package loaded, `hvpatch syms`
// prints exactly the guest's /proc/kallsyms text (kernel image and
// [module] lines), and sym and read --disasm name a module function.
func TestSymsEverySeries(t *testing.T) {
	testguest.Need(t)
	ks, err := testguest.AllKernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) {
			g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 1, MemoryMiB: 512})
			for _, m := range []string{"crc-itu-t", "dummy", "nls_utf8"} {
				if err := g.LoadModule(m); err != nil {
					t.Fatal(err)
				}
			}
			want, err := g.ReadFile("/proc/kallsyms")
			if err != nil {
				t.Fatal(err)
			}
			out, stderr, code := runCLI(t, "syms", g.Name)
			if code != 0 {
				t.Fatalf("syms: exit %d: %s", code, stderr)
			}
			gl, wl := strings.Split(out, "\n"), strings.Split(string(want), "\n")
			diff := 0
			for i := 0; i < max(len(gl), len(wl)); i++ {
				var a, b string
				if i < len(gl) {
					a = gl[i]
				}
				if i < len(wl) {
					b = wl[i]
				}
				if a != b {
					if diff < 10 {
						t.Errorf("line %d: syms %q, /proc/kallsyms %q", i+1, a, b)
					}
					diff++
				}
			}
			mods := strings.Count(out, "\t[")
			if diff > 0 || mods == 0 {
				t.Fatalf("%d of %d lines differ; %d module lines", diff, len(wl), mods)
			}
			t.Logf("%s: syms equals /proc/kallsyms: %d lines, %d of them module symbols", k.Release, len(wl)-1, mods)

			out, stderr, code = runCLI(t, "sym", g.Name, "dummy_change_carrier")
			if code != 0 || !strings.Contains(out, "dummy_change_carrier") || !strings.Contains(out, "dummy") {
				t.Fatalf("sym dummy_change_carrier: exit %d: %s%s", code, out, stderr)
			}
			out, stderr, code = runCLI(t, "read", g.Name, "dummy_change_carrier", "32", "--disasm")
			if code != 0 || !strings.Contains(out, "nop") {
				t.Fatalf("read dummy_change_carrier --disasm: exit %d: %s%s", code, out, stderr)
			}
			t.Logf("sym and read --disasm of dummy_change_carrier [dummy]:\n%s", out)
		})
	}
}
