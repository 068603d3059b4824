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
	list := filepath.Join(dir, "fix-kernels.txt")
	if _, err := readFixKernel(dir); err == nil {
		t.Fatal("no fix-kernels.txt: want an error")
	}
	if _, err := readFixKernels(dir); err == nil {
		t.Fatal("no fix-kernels.txt: want an error from readFixKernels")
	}
	os.WriteFile(list, nil, 0o644)
	if _, err := readFixKernel(dir); err == nil || !strings.Contains(err.Error(), "no longer in the apt archive") {
		t.Fatalf("empty list: got %v", err)
	}
	if _, err := readFixKernels(dir); err == nil || !strings.Contains(err.Error(), "no longer in the apt archive") {
		t.Fatalf("empty list, readFixKernels: got %v", err)
	}
	os.WriteFile(list, []byte("6.1-fix 6.1.0-47-cloud-amd64\n6.12-fix 6.12.107+deb12-cloud-amd64\n"), 0o644)
	if _, err := readFixKernel(dir); err == nil {
		t.Fatal("listed but not built: want an error")
	}
	kd := filepath.Join(dir, "kernels", "6.1.0-47-cloud-amd64")
	os.MkdirAll(kd, 0o755)
	os.WriteFile(filepath.Join(kd, "vmlinuz"), []byte("x"), 0o644)
	if _, err := readFixKernel(dir); err == nil || !strings.Contains(err.Error(), "6.12.107") {
		t.Fatalf("second listed kernel not built: got %v", err)
	}
	kd12 := filepath.Join(dir, "kernels", "6.12.107+deb12-cloud-amd64")
	os.MkdirAll(kd12, 0o755)
	os.WriteFile(filepath.Join(kd12, "vmlinuz"), []byte("x"), 0o644)
	k, err := readFixKernel(dir)
	if err != nil || k.Series != "6.1-fix" || k.Release != "6.1.0-47-cloud-amd64" || k.Dir != kd {
		t.Fatalf("got %+v, %v", k, err)
	}
	ks, err := readFixKernels(dir)
	if err != nil || len(ks) != 2 || ks[0] != k ||
		ks[1] != (Kernel{Series: "6.12-fix", Release: "6.12.107+deb12-cloud-amd64", Dir: kd12}) {
		t.Fatalf("readFixKernels: got %+v, %v", ks, err)
	}
	if k12, err := readFixKernelLabel(dir, "6.12-fix"); err != nil || k12 != ks[1] {
		t.Fatalf("6.12-fix: got %+v, %v", k12, err)
	}

	// Only the 6.12 build still served: FixKernel (6.1) says so, FixKernels
	// lists what there is.
	os.WriteFile(list, []byte("6.12-fix 6.12.107+deb12-cloud-amd64\n"), 0o644)
	if _, err := readFixKernel(dir); err == nil || !strings.Contains(err.Error(), "no 6.1-fix kernel") {
		t.Fatalf("6.1-fix missing: got %v", err)
	}
	if ks, err := readFixKernels(dir); err != nil || len(ks) != 1 || ks[0].Series != "6.12-fix" {
		t.Fatalf("6.12 only: got %+v, %v", ks, err)
	}
}

// fixNames lists the upstream fixes in testdata/fixes (not the refusal
// fixtures under refuse/, nor the 6.12 ones under 6.12/); each has a
// reproducer /bin/repro-<name> in the guest initramfs
// (testdata/guest/progs/repro-<name>.c).
func fixNames(t *testing.T) []string {
	return fixNamesIn(t, "", 4)
}

// fixNamesIn lists the fixes of one directory under testdata/fixes ("" for
// the 6.1 ones, "6.12"), at least min of them. A 6.12 fix has the name (and
// so the reproducer) of the 6.1 fix it corresponds to.
func fixNamesIn(t *testing.T, sub string, min int) []string {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "testdata", "fixes", sub)
	diffs, err := filepath.Glob(filepath.Join(dir, "*.diff"))
	if err != nil || len(diffs) < min {
		t.Fatalf("want at least %d fixes in %s, got %v (%v)", min, dir, diffs, err)
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
// FIXED on the newest build of the same series, which contains the fixes:
// testdata/fixes/*.diff on 6.1.0-47 and the newest 6.1, testdata/fixes/6.12/
// on the pinned 6.12 build and the newest 6.12. Boots four guests, one after
// the other.
func TestFixReproducers(t *testing.T) {
	Need(t)
	names := fixNames(t)
	names612 := fixNamesIn(t, "6.12", 1)
	old, err := FixKernel()
	if err != nil {
		t.Fatal(err)
	}
	old612, err := FixKernelLabel("6.12-fix")
	if err != nil {
		t.Fatal(err)
	}
	newest, err := KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	newest612, err := KernelSeries("6.12")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		k     Kernel
		names []string
		want  string
	}{
		{old, names, "VULNERABLE"},
		{newest, names, "FIXED"},
		{old612, names612, "VULNERABLE"},
		{newest612, names612, "FIXED"},
	} {
		t.Run(c.k.Release, func(t *testing.T) {
			g := Start(t, Options{Kernel: c.k, VCPUs: 1})
			for _, name := range c.names {
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
