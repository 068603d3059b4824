// Package testguest boots real Linux test guests under libvirt for hvpatch's
// integration tests, runs commands inside them over a serial shell, and
// exposes the guest's own view (/proc/kallsyms, ps, /proc/modules) as ground
// truth for what hvpatch recovers from the outside.
//
// The guests are transient libvirt domains with memfd-backed shared RAM, a
// console on ttyS0 written to a file, and a root shell on ttyS1 behind a unix
// socket. Their kernels and initramfs come from testdata/guest/build.sh.
package testguest

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// Kernel is one guest kernel built by testdata/guest/build.sh.
type Kernel struct {
	Series  string // "6.1" or "6.12"
	Release string // uname -r inside the guest
	Dir     string // holds vmlinuz, vmlinux, config, modules/
}

func (k Kernel) Vmlinuz() string { return filepath.Join(k.Dir, "vmlinuz") }

// Vmlinux is the uncompressed (stripped) kernel ELF from the same package.
func (k Kernel) Vmlinux() string { return filepath.Join(k.Dir, "vmlinux") }

var (
	prepareOnce sync.Once
	prepareErr  error
)

// RepoRoot is the directory holding hvpatch's go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("testguest: no go.mod above the working directory")
		}
		dir = parent
	}
}

// CacheDir is where the guest builder puts kernels and the initramfs.
func CacheDir() (string, error) {
	if d := os.Getenv("HVPATCH_GUEST_CACHE"); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "guest"), nil
}

// Need is the one gate of every test that needs the host's libvirtd or the
// guest files (kernels, initramfs): with -short (make unit) it skips the
// test, so that unit runs touch nothing outside the repository; otherwise
// it prepares the host once per process and fails the test if that fails.
func Need(tb testing.TB) {
	tb.Helper()
	if shortMode() {
		tb.Skip("needs libvirtd and the test guests: not run with -short (make unit); make test runs it")
	}
	if err := prepareHost(); err != nil {
		tb.Fatal(err)
	}
}

// shortMode is testing.Short, also safe in helper processes that run
// before the testing flags are parsed.
func shortMode() bool {
	f := flag.Lookup("test.short")
	return f != nil && f.Value.String() == "true"
}

// errShort is what the preparing functions return under -short when the
// guest files are not built: the test reached for the host without Need.
var errShort = errors.New("testguest: host set-up and guest builds are not run with -short (gate the test with testguest.Need, or build the guests: make guest)")

// prepareHost makes the host ready once per test process: the host set-up
// (packages, qemu.conf, daemons) only when libvirtd does not answer (make
// test runs it before the tests, and a mid-run run could restart libvirtd
// under other packages' guests), then the guest builder with KEEP_KERNELS=1,
// so that every package of a run boots the kernel set make guest (or the
// first builder) chose, never a newer build the archive gained meanwhile.
//
// With -short nothing runs: guest files already built in the repository's
// cache may be read, and without them the answer is errShort.
func prepareHost() error {
	if shortMode() {
		if _, err := readKernels(); err != nil {
			return errShort
		}
		return nil
	}
	prepareOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			prepareErr = err
			return
		}
		scripts := []string{"testdata/guest/build.sh"}
		if l, err := connect(); err == nil {
			l.Disconnect()
		} else {
			scripts = append([]string{"testdata/host-setup.sh"}, scripts...)
		}
		for _, script := range scripts {
			cmd := exec.Command("bash", filepath.Join(root, script))
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "KEEP_KERNELS=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				prepareErr = fmt.Errorf("testguest: %s failed: %v\n%s", script, err, out)
				return
			}
		}
	})
	return prepareErr
}

var (
	kernelsOnce sync.Once
	kernelSet   []Kernel
	kernelsErr  error
)

// Kernels lists the built guest kernels, building them first if needed. The
// list is read once per process: it stays the same for the whole run.
func Kernels() ([]Kernel, error) {
	if err := prepareHost(); err != nil {
		return nil, err
	}
	kernelsOnce.Do(func() { kernelSet, kernelsErr = readKernels() })
	return kernelSet, kernelsErr
}

func readKernels() ([]Kernel, error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	return kernelList(cache, "kernels.txt", "guest kernels", "testdata/guest/build.sh", "", false)
}

// KernelSeries returns the built kernel of one series ("6.1", "6.12").
func KernelSeries(series string) (Kernel, error) {
	ks, err := Kernels()
	if err != nil {
		return Kernel{}, err
	}
	for _, k := range ks {
		if k.Series == series {
			return k, nil
		}
	}
	return Kernel{}, fmt.Errorf("testguest: no kernel of series %s built", series)
}

// LibvirtSocket is the libvirtd socket the tests use.
func LibvirtSocket() string {
	if s := os.Getenv("HVPATCH_LIBVIRT_SOCKET"); s != "" {
		return s
	}
	return "/run/libvirt/libvirt-sock"
}

// connect opens a libvirt connection to the local qemu:///system driver.
func connect() (*libvirt.Libvirt, error) {
	l := libvirt.NewWithDialer(dialers.NewLocal(
		dialers.WithSocket(LibvirtSocket()),
		dialers.WithLocalTimeout(5*time.Second)))
	if err := l.Connect(); err != nil {
		return nil, fmt.Errorf("testguest: connecting to libvirtd at %s: %w", LibvirtSocket(), err)
	}
	return l, nil
}
