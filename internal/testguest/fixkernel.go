package testguest

import (
	"fmt"
	"path/filepath"
)

// FixKernel returns the pinned older 6.1 build that the upstream fixes in
// testdata/fixes apply to (label "6.1-fix" in fix-kernels.txt, apart from
// kernels.txt so that tests looping over Kernels do not boot it). It builds
// the guest files first if needed. An error says when the pinned build is
// missing, for example because it aged out of the apt archive.
func FixKernel() (Kernel, error) {
	cache, err := fixCache()
	if err != nil {
		return Kernel{}, err
	}
	return readFixKernel(cache)
}

// FixKernels returns every pinned older build listed in fix-kernels.txt, in
// file order: "6.1-fix" (testdata/fixes/*.diff) and "6.12-fix"
// (testdata/fixes/6.12/*.diff). Kernel.Series is the label. A build that aged
// out of the apt archive is not listed (build.sh warns); use FixKernelLabel
// to require one.
func FixKernels() ([]Kernel, error) {
	cache, err := fixCache()
	if err != nil {
		return nil, err
	}
	return readFixKernels(cache)
}

// FixKernelLabel returns the pinned older build with one label of
// fix-kernels.txt ("6.1-fix", "6.12-fix").
func FixKernelLabel(label string) (Kernel, error) {
	cache, err := fixCache()
	if err != nil {
		return Kernel{}, err
	}
	return readFixKernelLabel(cache, label)
}

func fixCache() (string, error) {
	if err := prepareHost(); err != nil {
		return "", err
	}
	return CacheDir()
}

func readFixKernel(cache string) (Kernel, error) {
	return readFixKernelLabel(cache, "6.1-fix")
}

func readFixKernelLabel(cache, label string) (Kernel, error) {
	ks, err := readFixKernels(cache)
	if err != nil {
		return Kernel{}, err
	}
	for _, k := range ks {
		if k.Series == label {
			return k, nil
		}
	}
	return Kernel{}, fmt.Errorf("testguest: %s lists no %s kernel: that pinned fix kernel is no longer in the apt archive "+
		"(see the warning of testdata/guest/build.sh)", filepath.Join(cache, "fix-kernels.txt"), label)
}

func readFixKernels(cache string) ([]Kernel, error) {
	return kernelList(cache, "fix-kernels.txt", "pinned fix kernels", "testdata/guest/build.sh",
		": the pinned fix kernels are no longer in the apt archive (see the warning of testdata/guest/build.sh)", true)
}
