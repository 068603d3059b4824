package testguest

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

func TestReadFixKernel(t *testing.T) {
	dir := t.TempDir()
	if _, err := readFixKernel(dir); err == nil {
		t.Fatal("no fix-kernels.txt: want an error")
	}
	os.WriteFile(filepath.Join(dir, "fix-kernels.txt"), nil, 0o644)
	if _, err := readFixKernel(dir); err == nil || !strings.Contains(err.Error(), "no longer in the apt archive") {
		t.Fatalf("empty list: got %v", err)
	}
	os.WriteFile(filepath.Join(dir, "fix-kernels.txt"), []byte("6.1-fix 6.1.0-47-cloud-amd64\n"), 0o644)
	if _, err := readFixKernel(dir); err == nil {
		t.Fatal("listed but not built: want an error")
	}
	kd := filepath.Join(dir, "kernels", "6.1.0-47-cloud-amd64")
	os.MkdirAll(kd, 0o755)
	os.WriteFile(filepath.Join(kd, "vmlinuz"), []byte("x"), 0o644)
	k, err := readFixKernel(dir)
	if err != nil || k.Series != "6.1-fix" || k.Release != "6.1.0-47-cloud-amd64" || k.Dir != kd {
		t.Fatalf("got %+v, %v", k, err)
	}
}

// fixNames lists the upstream fixes in testdata/fixes (not the refusal
// fixtures under refuse/); each has a reproducer /bin/repro-<name> in the
// guest initramfs (testdata/guest/progs/repro-<name>.c).
func fixNames(t *testing.T) []string {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	diffs, err := filepath.Glob(filepath.Join(root, "testdata", "fixes", "*.diff"))
	if err != nil || len(diffs) < 4 {
		t.Fatalf("want at least four fixes in testdata/fixes, got %v (%v)", diffs, err)
	}
	var names []string
	for _, d := range diffs {
		name := strings.TrimSuffix(filepath.Base(d), ".diff")
		if _, err := os.Stat(filepath.Join(root, "testdata", "guest", "progs", "repro-"+name+".c")); err != nil {
			t.Errorf("fix %s has no reproducer: %v", name, err)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// Every fix's reproducer reports VULNERABLE on the pinned older build and
// FIXED on the newest 6.1 build, which contains the fixes. Boots two guests,
// one after the other.
func TestFixReproducers(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests: not run with -short (make unit); make test runs it")
	}
	names := fixNames(t)
	old, err := FixKernel()
	if err != nil {
		t.Fatal(err)
	}
	newest, err := KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		k    Kernel
		want string
	}{{old, "VULNERABLE"}, {newest, "FIXED"}} {
		t.Run(c.k.Release, func(t *testing.T) {
			g := Start(t, Options{Kernel: c.k, VCPUs: 1})
			for _, name := range names {
				out, err := g.Run("/bin/repro-" + name)
				if err != nil {
					t.Errorf("%s: %v", name, err)
					continue
				}
				if got := strings.TrimSpace(out); got != c.want {
					t.Errorf("%s on %s: got %q, want %s", name, c.k.Release, got, c.want)
				} else {
					t.Logf("%s on %s: %s", name, c.k.Release, got)
				}
			}
		})
	}
}
