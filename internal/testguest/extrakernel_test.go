package testguest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadExtraKernels(t *testing.T) {
	dir := t.TempDir()
	if _, err := readExtraKernels(dir); err == nil {
		t.Fatal("no extra-kernels.txt: want an error")
	}
	for _, rel := range []string{"5.10.0-32-cloud-amd64", "7.2.13+deb14-cloud-amd64"} {
		if err := os.MkdirAll(filepath.Join(dir, "kernels", rel), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "kernels", rel, "vmlinuz"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	list := "5.10 5.10.0-32-cloud-amd64\nbad line here\n7.x 7.2.13+deb14-cloud-amd64\n"
	if err := os.WriteFile(filepath.Join(dir, "extra-kernels.txt"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	ks, err := readExtraKernels(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 2 || ks[0].Series != "5.10" || ks[1].Release != "7.2.13+deb14-cloud-amd64" {
		t.Fatalf("got %+v", ks)
	}
	// Listed but not built is an error.
	list += "6.12-deb13 6.12.117+deb13-cloud-amd64\n"
	if err := os.WriteFile(filepath.Join(dir, "extra-kernels.txt"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readExtraKernels(dir); err == nil || !strings.Contains(err.Error(), "not built") {
		t.Fatalf("want a not-built error, got %v", err)
	}
}

// Each extra kernel (5.10, 6.12+deb13, 7.x) boots, reports its release and
// loads the modules of its package that the initramfs carries.
func TestBootExtraKernels(t *testing.T) {
	Need(t)
	ks, err := ExtraKernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) {
			g := Start(t, Options{Kernel: k})
			t.Logf("%s booted under %s in %v", k.Release, g.Accel, g.BootDuration())
			if got := strings.TrimSpace(g.MustRun("uname -r")); got != k.Release {
				t.Fatalf("uname -r inside the guest = %q, kernel file is %q", got, k.Release)
			}
			for _, m := range []string{"crc-itu-t", "dummy", "nls_utf8"} {
				if err := g.LoadModule(m); err != nil {
					t.Fatalf("insmod %s: %v", m, err)
				}
			}
			mods, err := g.Modules()
			if err != nil {
				t.Fatal(err)
			}
			if len(mods) < 3 {
				t.Fatalf("/proc/modules lists %v", mods)
			}
		})
	}
}
