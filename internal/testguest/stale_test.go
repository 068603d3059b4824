package testguest

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	libvirt "github.com/digitalocean/go-libvirt"
)

// Clean-up destroys a test domain whose marker proves its creator gone,
// and leaves alone a domain with the same kind of name but no marker (some
// other user's), and one whose creator is alive.
func TestRemoveStaleDomainsOwnership(t *testing.T) {
	Need(t)
	lv, err := connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lv.Disconnect() }) // after the domains' clean-ups
	self, err := me()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := self
	dead.PID, dead.Start = cmd.Process.Pid, 1
	alive := self
	alive.PID = 1
	if alive.Start, err = processStart(1); err != nil {
		t.Fatal(err)
	}
	domXML := func(name, metadata string) string {
		return fmt.Sprintf(`<domain type='qemu'><name>%s</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<metadata>%s</metadata><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><memballoon model='none'/></devices></domain>`, name, metadata)
	}
	create := func(name, metadata string) libvirt.Domain {
		t.Helper()
		d, err := lv.DomainCreateXML(domXML(name, metadata), 0)
		if err != nil {
			t.Fatalf("creating %s: %v", name, err)
		}
		t.Cleanup(func() { lv.DomainDestroy(d) })
		return d
	}
	base := fmt.Sprintf("hvpt-%d-stale", dead.PID)
	// The orphan's marker names a dead process, so the clean-up of any
	// other test process starting a guest meanwhile may destroy it while
	// QEMU is still starting ("process exited while connecting to
	// monitor"): that is the clean-up working. Try again a few times.
	var orphan libvirt.Domain
	for try := 1; ; try++ {
		d, err := lv.DomainCreateXML(domXML(base+"-orphan", dead.metadata()), 0)
		if err == nil {
			orphan = d
			t.Cleanup(func() { lv.DomainDestroy(d) })
			break
		}
		if try == 5 || !strings.Contains(err.Error(), "exited") {
			t.Fatalf("creating %s-orphan: %v", base, err)
		}
		t.Logf("creating %s-orphan, try %d: %v (destroyed by a concurrent clean-up)", base, try, err)
	}
	foreign := create(base+"-foreign", "")
	living := create(base+"-alive", alive.metadata())
	o, ok := domainOwner(lv, orphan)
	o.XMLName = dead.XMLName
	if !ok || o != dead {
		t.Fatalf("marker read back %+v %v, want %+v", o, ok, dead)
	}
	removeStaleDomains(lv)
	active := func(d libvirt.Domain) bool {
		n, err := lv.DomainIsActive(d)
		return err == nil && n == 1
	}
	if active(orphan) {
		t.Error("a domain of a dead test process was not destroyed")
	}
	if !active(foreign) || !active(living) {
		t.Errorf("clean-up destroyed a domain it cannot prove its own: foreign %v, alive creator %v", active(foreign), active(living))
	}
	if !strings.HasPrefix(foreign.Name, "hvpt-") {
		t.Fatal("the foreign domain must look like a test domain by name")
	}
}
