package fixbuild

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
	"github.com/hvpatch/hvpatch/ksource"
	"github.com/hvpatch/hvpatch/objdiff"
	"github.com/hvpatch/hvpatch/patcher"
)

// liveFix is a booted guest with hvpatch attached, ready to build for.
type liveFix struct {
	g    *testguest.Guest
	live *patcher.Live
	pt   *patcher.Patcher
	gk   Guest
}

func startFix(t *testing.T, k testguest.Kernel) *liveFix {
	t.Helper()
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
	ctx := context.Background()
	live, err := patcher.OpenLive(ctx, testkernel.Domain(t, g), "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { live.Close() })
	k2 := live.Kernel
	gk := Guest{Banner: k2.Banner, Release: k2.Release, Symbols: k2.Symbols, Read: k2.AS.ReadVirt, ModuleSymbols: k2.ModuleSymbols}
	if gk.BuildID, err = patcher.BuildID(patcher.KernelTarget{K: k2}); err != nil {
		t.Fatal(err)
	}
	return &liveFix{g: g, live: live, pt: &patcher.Patcher{State: patcher.StateDir{Dir: t.TempDir()}}, gk: gk}
}

func (lf *liveFix) build(t *testing.T, diffFile string) (*Result, error) {
	t.Helper()
	diff, err := os.ReadFile(diffFile)
	if err != nil {
		t.Fatal(err)
	}
	return Build(context.Background(), lf.gk, diff, Options{OutDir: t.TempDir(), DiffName: diffFile,
		Progress: func(m string) { t.Log(m) }})
}

func logSteps(t *testing.T, res *Result) {
	for _, s := range res.Steps {
		t.Logf("step %-45s %10v cached=%v %s", s.Name, s.Duration, s.Cached, s.Detail)
	}
	for _, n := range res.Notes {
		t.Logf("note: %s", n)
	}
}

// TestGuestBuildVersion builds a small made-up fix of fs/proc/version.c for
// each test guest (6.1; 6.12 with IBT and call padding), applies the bundle
// and reverts it.
func TestGuestBuildVersion(t *testing.T) {
	testguest.Need(t)
	ks, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) { testBuildVersion(t, k) })
	}
}

func testBuildVersion(t *testing.T, k testguest.Kernel) {
	lf := startFix(t, k)
	res, err := lf.build(t, "testdata/version-marker.diff")
	if err != nil {
		t.Fatal(err)
	}
	logSteps(t, res)
	if len(res.Functions) != 1 || res.Functions[0].Name != "version_proc_show" || res.Functions[0].Kind != "changed" {
		t.Fatalf("functions %+v, want version_proc_show changed", res.Functions)
	}
	p, err := patcher.LoadPatch(res.PatchFile)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	before := lf.g.MustRun("cat /proc/version")
	if _, err := lf.pt.Apply(ctx, lf.live.Domain, p, patcher.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	after := lf.g.MustRun("cat /proc/version")
	if !strings.HasPrefix(after, strings.TrimSpace(before)) || !strings.Contains(after, "hvpatch build test") {
		t.Fatalf("after apply /proc/version = %q, want the banner then the fix's line", after)
	}
	if _, err := lf.pt.Revert(ctx, lf.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if got := lf.g.MustRun("cat /proc/version"); got != before {
		t.Fatalf("after revert /proc/version = %q, want %q", got, before)
	}
	if err := lf.g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}

// fixNames lists the upstream fixes in testdata/fixes: each has a
// reproducer /bin/repro-NAME in the guest that prints VULNERABLE or FIXED.
// The 6.1 fixes are diffs against the 6.1-fix kernel's source in
// testdata/fixes; those for the 6.12-fix kernel in testdata/fixes/6.12.
func fixDir(t *testing.T, k testguest.Kernel) string {
	t.Helper()
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if k.Series == "6.1-fix" {
		return filepath.Join(root, "testdata", "fixes")
	}
	return filepath.Join(root, "testdata", "fixes", strings.TrimSuffix(k.Series, "-fix"))
}

func fixNames(t *testing.T, dir string, min int) []string {
	t.Helper()
	diffs, err := filepath.Glob(filepath.Join(dir, "*.diff"))
	if err != nil || len(diffs) < min {
		t.Fatalf("want at least %d fixes in %s: %v %v", min, dir, diffs, err)
	}
	var out []string
	for _, d := range diffs {
		out = append(out, strings.TrimSuffix(filepath.Base(d), ".diff"))
	}
	return out
}

// reproduce runs a fix's reproducer and returns VULNERABLE or FIXED.
func (lf *liveFix) reproduce(t *testing.T, name string) string {
	t.Helper()
	out, err := lf.g.Run("/bin/repro-" + name)
	if err != nil {
		t.Fatalf("repro-%s: %v: %s", name, err, out)
	}
	return strings.TrimSpace(out)
}

// fixSpecials says which fixes' changed functions contain a jump label or
// a WARN (after inlining; testdata/fixes/README.md), so the test checks
// that the linker set them up from the guest's state.
var fixSpecials = map[string]struct{ jumpLabel, warn bool }{
	"tcp-attach-filter":       {jumpLabel: true, warn: true},
	"fcntl-rw-hint-immutable": {warn: true},
}

// TestGuestBuildFixes builds real upstream stable fixes for an older
// Debian 6.1 build and shows each take effect and go away again in a
// running guest, with its reproducer running in a loop on every vCPU.
func TestGuestBuildFixes(t *testing.T) {
	testguest.Need(t)
	ks, err := testguest.FixKernels()
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) < 2 {
		t.Fatalf("want the 6.1 and 6.12 fix kernels, have %v", ks)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) { testBuildFixes(t, k) })
	}
}

func testBuildFixes(t *testing.T, k testguest.Kernel) {
	dir := fixDir(t, k)
	names := fixNames(t, dir, map[bool]int{true: 4, false: 1}[k.Series == "6.1-fix"])
	lf := startFix(t, k)
	ctx := context.Background()
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			res, err := lf.build(t, filepath.Join(dir, name+".diff"))
			if err != nil {
				t.Fatal(err)
			}
			logSteps(t, res)
			t.Logf("functions: %+v", res.Functions)
			p, err := patcher.LoadPatch(res.PatchFile)
			if err != nil {
				t.Fatal(err)
			}
			if got := lf.reproduce(t, name); got != "VULNERABLE" {
				t.Fatalf("before apply: %q, want VULNERABLE", got)
			}
			lf.g.MustRun(fmt.Sprintf("for c in $(seq 0 %d); do taskset -c $c sh -c 'while :; do /bin/repro-%s >/dev/null 2>&1; done' & done; true", lf.g.VCPUs-1, name))
			defer lf.g.MustRun("kill $(jobs -p) 2>/dev/null; pkill -f 'while :' ; true")
			r, err := lf.pt.Apply(ctx, lf.live.Domain, p, patcher.ApplyOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("applied: %s", r.Message)
			var jumps, warns int
			for _, e := range r.Plan.Edits {
				if e.Replace == nil || e.Replace.LinkMap == nil {
					continue
				}
				for _, j := range e.Replace.LinkMap.JumpLabels {
					t.Logf("jump label %s key %s enabled=%v jmp=%v", j.Site, j.Key, j.Enabled, j.Jump)
					jumps++
				}
				for _, b := range e.Replace.LinkMap.Bugs {
					t.Logf("bug site %s %s:%d warn=%v", b.Site, b.File, b.Line, b.Warn)
					if b.Warn {
						warns++
					}
				}
			}
			if want := fixSpecials[name]; (want.jumpLabel && jumps == 0) || (want.warn && warns == 0) {
				t.Errorf("%s: %d jump-label and %d WARN sites linked; the fix's changed code has %+v", name, jumps, warns, want)
			}
			if got := lf.reproduce(t, name); got != "FIXED" {
				t.Fatalf("after apply: %q, want FIXED", got)
			}
			if _, err := lf.pt.Revert(ctx, lf.live.Domain, p.ID); err != nil {
				t.Fatal(err)
			}
			if got := lf.reproduce(t, name); got != "VULNERABLE" {
				t.Fatalf("after revert: %q, want VULNERABLE", got)
			}
			if err := lf.g.ConsoleError(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// memHash hashes the guest's kernel text and first MiB (the code area):
// a refused build must leave both as they were.
func (lf *liveFix) memHash(t *testing.T) string {
	t.Helper()
	k := lf.live.Kernel
	text, err := k.Symbols.Addr("_stext")
	if err != nil {
		t.Fatal(err)
	}
	etext, err := k.Symbols.Addr("_etext")
	if err != nil || etext <= text {
		t.Fatalf("_etext: %v", err)
	}
	h := sha256.New()
	buf := make([]byte, etext-text)
	if err := k.AS.ReadVirt(text, buf); err != nil {
		t.Fatal(err)
	}
	h.Write(buf)
	low := make([]byte, 1<<20)
	if err := lf.live.Mem.ReadPhys(0, low); err != nil {
		t.Fatal(err)
	}
	h.Write(low)
	return hex.EncodeToString(h.Sum(nil))
}

// vmlinuxBanner reads the Linux banner out of a kernel image file.
func vmlinuxBanner(t *testing.T, k testguest.Kernel) string {
	t.Helper()
	b, err := os.ReadFile(k.Vmlinux())
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, []byte("Linux version "+k.Release+" "))
	if i < 0 {
		t.Fatalf("no banner for %s in %s", k.Release, k.Vmlinux())
	}
	end := bytes.IndexByte(b[i:], '\n')
	return string(b[i : i+end])
}

// TestGuestBuildRefusals: fixes a hot patch cannot carry, and a source tree
// that is not the guest's build, are refused with the reason; nothing is
// written to the guest.
func TestGuestBuildRefusals(t *testing.T) {
	testguest.Need(t)
	k, err := testguest.FixKernel()
	if err != nil {
		t.Fatal(err)
	}
	lf := startFix(t, k)
	before := lf.memHash(t)
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct{ name, diff, want string }{
		{"struct field", filepath.Join(root, "testdata/fixes/refuse/struct-field.diff"), "struct timerfd_ctx: size"},
		{"header only", filepath.Join(root, "testdata/fixes/refuse/header-only.diff"), "changes a header"},
		{"init code", filepath.Join(root, "testdata/fixes/refuse/init-function.diff"), "fcntl_init: the fix changes __init"},
	}
	for _, c := range cases {
		_, err := lf.build(t, c.diff)
		var r *RefusedError
		if !errors.As(err, &r) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want a refusal naming %q", c.name, err, c.want)
		} else {
			t.Logf("%s: %v", c.name, err)
		}
	}

	// The newest 6.1 build's source against this older guest: the fix
	// applies, but the compiled code is not what the guest runs.
	newer, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	b, err := ksource.ParseBanner(vmlinuxBanner(t, newer))
	if err != nil {
		t.Fatal(err)
	}
	tree, err := ksource.Prepare(context.Background(), b, ksource.Options{Progress: func(m string) { t.Log(m) }})
	if err != nil {
		t.Fatal(err)
	}
	diff, err := os.ReadFile("testdata/sock-comment.diff")
	if err != nil {
		t.Fatal(err)
	}
	_, err = Build(context.Background(), lf.gk, diff, Options{OutDir: t.TempDir(), Source: tree.Dir})
	var r *RefusedError
	var mm *objdiff.MismatchError
	if !errors.As(err, &r) || !errors.As(err, &mm) || !strings.Contains(err.Error(), "differs from the guest's copy") {
		t.Errorf("wrong build: got %v, want a refusal naming the first differing function", err)
	} else {
		t.Logf("wrong build: %v", err)
	}
	if after := lf.memHash(t); after != before {
		t.Fatal("guest kernel text or first MiB changed during refused builds")
	}
}

// TestGuestBuildModule builds a fix in module code (drivers/net/dummy.c,
// loaded as dummy.ko): the build finds the module from the guest's own
// module symbol tables, and the bundle replaces the module's function.
func TestGuestBuildModule(t *testing.T) {
	testguest.Need(t)
	k, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	lf := startFix(t, k)
	if err := lf.g.LoadModule("dummy"); err != nil {
		t.Fatal(err)
	}
	// The carrier can be set only while the interface is up.
	lf.g.MustRun("ip link set dummy0 up")
	carrier := "echo 0 > /sys/class/net/dummy0/carrier 2>/dev/null && echo down || echo refused; echo 1 > /sys/class/net/dummy0/carrier"
	if got := strings.TrimSpace(lf.g.MustRun(carrier)); got != "down" {
		t.Fatalf("before the patch: %q, want down", got)
	}
	res, err := lf.build(t, "testdata/dummy-carrier.diff")
	if err != nil {
		t.Fatal(err)
	}
	logSteps(t, res)
	if len(res.Functions) != 1 || res.Functions[0].Name != "dummy_change_carrier" || res.Functions[0].Module != "dummy" {
		t.Fatalf("functions %+v, want dummy_change_carrier in module dummy", res.Functions)
	}
	text, err := os.ReadFile(res.PatchFile)
	if err != nil || !strings.Contains(string(text), "module: dummy") {
		t.Fatalf("patch file lacks module: dummy (%v):\n%s", err, text)
	}
	p, err := patcher.LoadPatch(res.PatchFile)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := lf.pt.Apply(ctx, lf.live.Domain, p, patcher.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(lf.g.MustRun(carrier)); got != "refused" {
		t.Fatalf("with the patch: %q, want refused", got)
	}
	if _, err := lf.pt.Revert(ctx, lf.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(lf.g.MustRun(carrier)); got != "down" {
		t.Fatalf("after revert: %q, want down", got)
	}
	if err := lf.g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}
