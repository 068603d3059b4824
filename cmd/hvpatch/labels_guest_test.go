package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// TestGuestLabels checks, on both kernels, what the operator reads against
// the guest's own view: phys_base is the value the kernel wrote into its
// vmcoreinfo note; ps lists one idle task per CPU; 0 is an address;
// disassembly names call targets; and the replacement example, compiled
// against a header that hvpatch btf made from the live guest's BTF,
// changes /proc/version.
func TestGuestLabels(t *testing.T) {
	testguest.Need(t)
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	only := os.Getenv("HVPATCH_TEST_SERIES")
	for _, k := range kernels {
		if only != "" && k.Series != only {
			continue
		}
		t.Run(k.Series, func(t *testing.T) {
			g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
			mustJSON := func(v any, args ...string) {
				t.Helper()
				out, stderr, code := runCLI(t, append([]string{"--json"}, args...)...)
				if code != 0 {
					t.Fatalf("hvpatch %v: exit %d: %s", args, code, stderr)
				}
				if err := json.Unmarshal([]byte(out), v); err != nil {
					t.Fatalf("hvpatch %v: %q: %v", args, out, err)
				}
			}

			// phys_base, as the kernel defines it (__pa_symbol(x) = x -
			// __START_KERNEL_map + phys_base): the physical address of
			// _text (/proc/iomem "Kernel code") minus its link offset
			// (_text from /proc/kallsyms); and, where the kernel has a
			// vmcoreinfo note, the value the kernel wrote there.
			var info service.Info
			mustJSON(&info, "info", g.Name)
			iomem := g.MustRun("grep 'Kernel code' /proc/iomem")
			start, _, _ := strings.Cut(strings.TrimSpace(iomem), "-")
			textPhys, _ := strconv.ParseUint(start, 16, 64)
			textVirt, _ := strconv.ParseUint(strings.Fields(g.MustRun("grep -w _text /proc/kallsyms"))[0], 16, 64)
			want := textPhys - (textVirt - 0xffffffff80000000)
			if info.TextPhys != service.HexAddr(textPhys) || info.PhysBase != service.HexAddr(want) {
				t.Errorf("info: _text physical %s, phys_base %s; the guest: _text at physical %#x, phys_base %#x", info.TextPhys, info.PhysBase, textPhys, want)
			}
			if out, err := g.Run("cat /sys/kernel/vmcoreinfo"); err == nil {
				if f := strings.Fields(out); len(f) == 2 {
					note, err1 := strconv.ParseUint(f[0], 16, 64)
					size, err2 := strconv.ParseUint(f[1], 16, 64)
					if err1 == nil && err2 == nil && note != 0 && size > 0 && size < 1<<16 {
						var mem service.Bytes
						mustJSON(&mem, "mem", "read", g.Name, "--phys", fmt.Sprintf("%#x", note), fmt.Sprint(size))
						raw, _ := hex.DecodeString(mem.Hex)
						if m := regexp.MustCompile(`NUMBER\(phys_base\)=(-?\d+)`).FindSubmatch(raw); m != nil {
							v, _ := strconv.ParseInt(string(m[1]), 10, 64)
							if info.PhysBase != service.HexAddr(uint64(v)) {
								t.Errorf("phys_base %s; the kernel's vmcoreinfo says %#x", info.PhysBase, uint64(v))
							}
						}
					}
				}
			}

			// One idle task per CPU.
			var tasks []service.Task
			mustJSON(&tasks, "ps", g.Name)
			idle := map[string]bool{}
			for _, tk := range tasks {
				if tk.PID == 0 {
					idle[tk.Task] = true
				}
			}
			ncpu, _ := strconv.Atoi(strings.TrimSpace(g.MustRun("nproc --all")))
			if len(idle) != ncpu {
				t.Errorf("ps: %d idle tasks (PID 0), the guest has %d CPUs: %+v", len(idle), ncpu, tasks[:min(len(tasks), 4)])
			}

			// 0 is an address, not a symbol name.
			_, stderr, code := runCLI(t, "read", g.Name, "0", "16")
			if code != 1 || strings.Contains(stderr, "no symbol") || !strings.Contains(stderr, "0x0") {
				t.Errorf("read 0 16: exit %d, %q", code, stderr)
			}

			// Call targets named, immediates unsigned.
			out, _, code := runCLI(t, "read", g.Name, "version_proc_show", "64", "--disasm")
			t.Logf("hvpatch read %s version_proc_show 64 --disasm:\n%s", g.Name, out)
			if code != 0 || !strings.Contains(out, "<seq_printf>") || strings.Contains(out, "$-0x") {
				t.Errorf("read --disasm:\n%s", out)
			}

			// The replacement example against the guest's own header.
			dir := t.TempDir()
			header := filepath.Join(dir, "guest.h")
			if _, stderr, code := runCLI(t, "btf", g.Name, "--format", "c", "--type", "uts_namespace", "--type", "seq_file", "--type", "seq_printf", "-o", header); code != 0 {
				t.Fatalf("btf: %s", stderr)
			}
			root, _ := testguest.RepoRoot()
			objs := filepath.Join(dir, "objs")
			mk := exec.Command("make", "-s", "-C", filepath.Join(root, "examples/replace"), "REPLACE_KCONFIG="+filepath.Join(k.Dir, "config"), "REPLACE_OUT="+objs, "REPLACE_HEADER="+header)
			if b, err := mk.CombinedOutput(); err != nil {
				t.Fatalf("make examples/replace against the guest header: %v\n%s", err, b)
			}
			patch := filepath.Join(dir, "replace.yaml")
			os.WriteFile(patch, []byte(`id: replace-btf-header
match: {release: ["*"]}
edits:
  - kind: replace
    function: version_proc_show
    object: objs/version_proc_show.o
    with: hvpatch_version_proc_show
`), 0o644)
			state := filepath.Join(dir, "state")
			if _, stderr, code := runCLI(t, "apply", g.Name, patch, "--state-dir", state); code != 0 {
				t.Fatalf("apply: %s", stderr)
			}
			if v, _ := g.ProcVersion(); !strings.Contains(v, "(version_proc_show replaced by hvpatch)") || !strings.Contains(v, g.Release) {
				t.Errorf("/proc/version after the replace: %q", v)
			}
			if _, stderr, code := runCLI(t, "revert", g.Name, "replace-btf-header", "--state-dir", state); code != 0 {
				t.Errorf("revert: %s", stderr)
			}
			if v, _ := g.ProcVersion(); strings.Contains(v, "replaced by hvpatch") {
				t.Errorf("/proc/version after the revert: %q", v)
			}
		})
	}
}
