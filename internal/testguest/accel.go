package testguest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// probeAccel decides between KVM and TCG for test guests. HVPATCH_TEST_ACCEL
// ("kvm" or "tcg") wins. Otherwise a guest is booted once under KVM: on hosts
// where /dev/kvm opens but nested Linux hangs in early boot, it never prints
// its ready line and TCG is used. The answer is cached per kernel release in
// the guest cache, under a file lock so parallel test binaries probe once.
func probeAccel(lv *libvirt.Libvirt, k Kernel) (string, error) {
	switch a := os.Getenv("HVPATCH_TEST_ACCEL"); a {
	case "kvm", "tcg":
		return a, nil
	case "":
	default:
		return "", fmt.Errorf("HVPATCH_TEST_ACCEL=%q: want kvm or tcg", a)
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		return "tcg", nil
	} else {
		f.Close()
	}
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	path := filepath.Join(cache, "accel-"+k.Release)
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	if b, err := os.ReadFile(path); err == nil {
		if a := strings.TrimSpace(string(b)); a == "kvm" || a == "tcg" {
			return a, nil
		}
	}
	accel := "tcg"
	if bootsUnderKVM(lv, k) {
		accel = "kvm"
	}
	return accel, os.WriteFile(path, []byte(accel+"\n"), 0o644)
}

func bootsUnderKVM(lv *libvirt.Libvirt, k Kernel) bool {
	cache, err := CacheDir()
	if err != nil {
		return false
	}
	dir, err := os.MkdirTemp("", "hvpt-probe-")
	if err != nil {
		return false
	}
	defer os.RemoveAll(dir)
	name := fmt.Sprintf("hvpt-%d-0", os.Getpid())
	xml, err := domainXML(domainParams{
		Name: name, Type: "kvm", MemoryMiB: 256, VCPUs: 1,
		Kernel: k.Vmlinuz(), Initrd: filepath.Join(cache, "initramfs.cpio.gz"),
		Console: filepath.Join(dir, "console.log"), Shell: filepath.Join(dir, "shell.sock"),
	})
	if err != nil {
		return false
	}
	dom, err := lv.DomainCreateXML(xml, 0)
	if err != nil {
		return false
	}
	defer lv.DomainDestroy(dom)
	_, err = waitForLine(filepath.Join(dir, "console.log"), readyLine, 20*time.Second, func() error { return nil })
	return err == nil
}
