package testguest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
)

var (
	extraOnce sync.Once
	extraSet  []Kernel
	extraErr  error
)

// ExtraKernels returns the guest kernels of the other Debian series the
// host's mirror serves (testdata/guest/build-extra.sh): bullseye 5.10
// (label "5.10"), trixie 6.12+deb13 ("6.12-deb13") and sid 7.x ("7.x"), in
// extra-kernels.txt order; Kernel.Series is the label. They are apart from
// kernels.txt so that tests looping over Kernels do not boot them. The first
// call builds them (KEEP_KERNELS=1: a set already built is kept); the list
// is read once per process. A series the archive does not serve is left
// out (the builder warns).
func ExtraKernels() ([]Kernel, error) {
	if err := prepareHost(); err != nil {
		return nil, err
	}
	extraOnce.Do(func() {
		cache, err := CacheDir()
		if err != nil {
			extraErr = err
			return
		}
		if !shortMode() {
			if extraErr = buildExtra(); extraErr != nil {
				return
			}
		}
		extraSet, extraErr = readExtraKernels(cache)
	})
	return extraSet, extraErr
}

// AllKernels returns Kernels and then ExtraKernels: one guest kernel of
// every Debian series, for tests that must hold on all of them.
func AllKernels() ([]Kernel, error) {
	ks, err := Kernels()
	if err != nil {
		return nil, err
	}
	extra, err := ExtraKernels()
	if err != nil {
		return nil, err
	}
	return append(ks, extra...), nil
}

// ExtraKernel returns the extra kernel with one label ("5.10", "6.12-deb13", "7.x").
func ExtraKernel(label string) (Kernel, error) {
	ks, err := ExtraKernels()
	if err != nil {
		return Kernel{}, err
	}
	for _, k := range ks {
		if k.Series == label {
			return k, nil
		}
	}
	return Kernel{}, fmt.Errorf("testguest: no extra kernel %s built (see the warnings of testdata/guest/build-extra.sh)", label)
}

func buildExtra() error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command("bash", filepath.Join(root, "testdata/guest/build-extra.sh"))
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "KEEP_KERNELS=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("testguest: testdata/guest/build-extra.sh failed: %v\n%s", err, out)
	}
	return nil
}

func readExtraKernels(cache string) ([]Kernel, error) {
	return kernelList(cache, "extra-kernels.txt", "extra kernels", "testdata/guest/build-extra.sh", "", true)
}
