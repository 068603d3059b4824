package testguest

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// FixKernel returns the pinned older 6.1 build that the upstream fixes in
// testdata/fixes apply to (listed in fix-kernels.txt, apart from kernels.txt
// so that tests looping over Kernels do not boot it). It builds the guest
// files first if needed. An error says when the pinned build is missing, for
// example because it aged out of the apt archive.
func FixKernel() (Kernel, error) {
	if err := prepareHost(); err != nil {
		return Kernel{}, err
	}
	cache, err := CacheDir()
	if err != nil {
		return Kernel{}, err
	}
	return readFixKernel(cache)
}

func readFixKernel(cache string) (Kernel, error) {
	path := filepath.Join(cache, "fix-kernels.txt")
	f, err := os.Open(path)
	if err != nil {
		return Kernel{}, fmt.Errorf("testguest: pinned fix kernel not built (run testdata/guest/build.sh): %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 2 {
			continue
		}
		k := Kernel{Series: fields[0], Release: fields[1], Dir: filepath.Join(cache, "kernels", fields[1])}
		if _, err := os.Stat(k.Vmlinuz()); err != nil {
			return Kernel{}, fmt.Errorf("testguest: fix kernel %s listed but not built: %w", k.Release, err)
		}
		return k, nil
	}
	if err := sc.Err(); err != nil {
		return Kernel{}, err
	}
	return Kernel{}, fmt.Errorf("testguest: %s lists no kernel: the pinned fix kernel is no longer in the apt archive "+
		"(see the warning of testdata/guest/build.sh)", path)
}
