// Package demo is `make demo`: it boots a real guest and drives the hvpatch
// CLI against it, printing what a user would see. As a test it also checks
// the CLI end to end: the kill switch empties /proc/version and the revert
// brings it back.
package demo

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// say prints a demo line on stdout (go test -v passes it through).
func say(format string, args ...any) { fmt.Printf(format+"\n", args...) }

// hvpatch runs the CLI and returns its stdout; stderr joins the error.
func hvpatch(t *testing.T, bin string, args ...string) string {
	t.Helper()
	say("\n$ hvpatch %s", strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hvpatch %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

type freeze struct {
	WindowUS float64 `json:"window_us"`
	Method   string  `json:"method"`
	VCPUs    int     `json:"vcpus"`
}

func TestDemo(t *testing.T) {
	testguest.Need(t)
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	// make demo passes the binary it built; otherwise build one.
	bin := os.Getenv("HVPATCH_BIN")
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "hvpatch")
		if out, err := exec.Command("go", "build", "-o", bin, filepath.Join(root, "cmd", "hvpatch")).CombinedOutput(); err != nil {
			t.Fatalf("building hvpatch: %v\n%s", err, out)
		}
	}
	series := os.Getenv("HVPATCH_DEMO_SERIES")
	if series == "" {
		series = "6.12"
	}
	k, err := testguest.KernelSeries(series)
	if err != nil {
		t.Fatal(err)
	}
	say("== booting a %s guest (%s) under libvirt", k.Release, "busybox initramfs")
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
	say("domain %s (%s) is up, accelerator %s, booted in %v", g.Name, g.UUID, g.Accel, g.BootDuration())
	state := t.TempDir()
	patch := filepath.Join(root, "configs", "patches", "version-kill-switch.yaml")
	common := []string{"--state-dir", state}

	before := g.MustRun("cat /proc/version")
	say("\n[guest]# cat /proc/version\n%s", before)
	if !strings.HasPrefix(before, "Linux version") {
		t.Fatalf("/proc/version: %q", before)
	}

	plan := hvpatch(t, bin, append([]string{"apply", g.Name, patch, "--dry-run"}, common...)...)
	fmt.Print(plan)
	for _, want := range []string{"old: 0f 1f 44 00 00", "new: 31 c0 c3 cc cc", "nopl", "xor %eax,%eax"} {
		if !strings.Contains(plan, want) {
			t.Fatalf("the dry-run plan lacks %q", want)
		}
	}
	if after := g.MustRun("cat /proc/version"); after != before {
		t.Fatalf("/proc/version changed by a dry run: %q", after)
	}

	var applied, reverted struct {
		Message string  `json:"message"`
		Freeze  *freeze `json:"freeze"`
	}
	out := hvpatch(t, bin, append([]string{"apply", g.Name, patch, "--json"}, common...)...)
	if err := json.Unmarshal([]byte(out), &applied); err != nil || applied.Freeze == nil {
		t.Fatalf("apply --json output %q: %v", out, err)
	}
	say("%s", applied.Message)

	during := g.MustRun("cat /proc/version")
	say("\n[guest]# cat /proc/version\n%s(%d bytes)", during, len(during))
	if during != "" {
		t.Fatalf("/proc/version with the kill switch applied: %q", during)
	}

	fmt.Print(hvpatch(t, bin, append([]string{"status", g.Name}, common...)...))
	fmt.Print(hvpatch(t, bin, append([]string{"apply", g.Name, patch}, common...)...))

	out = hvpatch(t, bin, append([]string{"revert", g.Name, "version-kill-switch", "--json"}, common...)...)
	if err := json.Unmarshal([]byte(out), &reverted); err != nil || reverted.Freeze == nil {
		t.Fatalf("revert --json output %q: %v", out, err)
	}
	say("%s", reverted.Message)

	after := g.MustRun("cat /proc/version")
	say("\n[guest]# cat /proc/version\n%s", after)
	if after != before {
		t.Fatalf("/proc/version after revert: %q, want %q", after, before)
	}
	fmt.Print(hvpatch(t, bin, append([]string{"status", g.Name}, common...)...))

	say("\n== freeze windows (guest vCPUs stopped while code changed)")
	say("apply:  %8.0f µs (%s, %d vCPUs)", applied.Freeze.WindowUS, applied.Freeze.Method, applied.Freeze.VCPUs)
	say("revert: %8.0f µs (%s, %d vCPUs)", reverted.Freeze.WindowUS, reverted.Freeze.Method, reverted.Freeze.VCPUs)
	g.Destroy()

	demoBuild(t, bin, root)
}

// demoBuild turns a real upstream fix (CVE-2026-52928, af_unix) into a hot
// patch for a guest running an older Debian 6.1 build that lacks it, and
// applies it: the reproducer in the guest goes from VULNERABLE to FIXED.
func demoBuild(t *testing.T, bin, root string) {
	k, err := testguest.FixKernel()
	if err != nil {
		t.Fatal(err)
	}
	say("\n== hvpatch build: an upstream fix, as a diff, into a running guest")
	say("booting a %s guest (an older Debian 6.1 build, without the fix)", k.Release)
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
	repro := "/bin/repro-unix-siocatmark"
	state, out := t.TempDir(), t.TempDir()
	show := func(want string) {
		got := strings.TrimSpace(g.MustRun(repro))
		say("\n[guest]# %s\n%s", repro, got)
		if got != want {
			t.Fatalf("%s printed %q, want %q", repro, got, want)
		}
	}
	show("VULNERABLE")
	diff := filepath.Join(root, "testdata", "fixes", "unix-siocatmark.diff")
	res := hvpatch(t, bin, "build", g.Name, diff, "-o", out)
	fmt.Print(res)
	lines := strings.Split(strings.TrimSpace(res), "\n")
	bundle := lines[len(lines)-1]
	if !strings.HasSuffix(bundle, ".yaml") {
		t.Fatalf("hvpatch build's last line is %q, want the patch file", bundle)
	}
	patchText, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	say("\n$ cat %s\n%s", bundle, patchText)
	fmt.Print(hvpatch(t, bin, "apply", g.Name, bundle, "--state-dir", state))
	show("FIXED")
	fmt.Print(hvpatch(t, bin, "revert", g.Name, "unix-siocatmark", "--state-dir", state))
	show("VULNERABLE")
	if err := g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}
