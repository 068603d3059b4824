// Package testkernel opens a test guest through hvpatch's own layers
// (libvirt connection, guest memory, the attached kernel) and builds
// replacement-function objects for its kernel. It serves the guest tests of
// packages above introspect; introspect's and hypervisor's own tests cannot
// import it (it imports them).
package testkernel

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/introspect"
)

// Domain connects to libvirt and looks the guest's domain up; the
// connection closes when the test ends.
func Domain(t testing.TB, g *testguest.Guest) *hypervisor.Domain {
	t.Helper()
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	dom, err := conn.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	return dom
}

// Live is a guest opened for introspection.
type Live struct {
	Guest  *testguest.Guest
	Dom    *hypervisor.Domain
	Mem    hypervisor.PhysMem
	Kernel *introspect.Kernel
}

// Attach maps the guest's memory (best backend) and attaches to its kernel.
func Attach(t testing.TB, g *testguest.Guest) *Live {
	t.Helper()
	ctx := context.Background()
	dom := Domain(t, g)
	mem, err := dom.OpenPhysMem(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	cpus, err := dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	k, err := introspect.Open(ctx, mem, cpus)
	if err != nil {
		t.Fatalf("introspect.Open on %s: %v", g.Kernel.Release, err)
	}
	return &Live{Guest: g, Dom: dom, Mem: mem, Kernel: k}
}

// BuildReplacements compiles examples/replace for the kernel's config into
// a new directory, then each extra source (object name → C text) with the
// same compiler flags, and returns the directory (NAME.o for each).
func BuildReplacements(t testing.TB, kern testguest.Kernel, extra map[string]string) string {
	t.Helper()
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	kcfg := filepath.Join(kern.Dir, "config")
	run := func(name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.Dir = root
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, b)
		}
		return string(b)
	}
	run("make", "-s", "-C", "examples/replace", "REPLACE_KCONFIG="+kcfg, "REPLACE_OUT="+out)
	flags := strings.Fields(run("make", "-s", "-C", "examples/replace", "replace-flags", "REPLACE_KCONFIG="+kcfg))
	for name, src := range extra {
		c := filepath.Join(out, name+".c")
		if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		run("gcc", append(flags, "-c", c, "-o", filepath.Join(out, name+".o"))...)
	}
	return out
}
