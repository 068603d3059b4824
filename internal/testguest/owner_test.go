package testguest

import (
	"encoding/xml"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The marker round-trips through the domain XML, and only a marker whose
// creator is provably gone (same boot, pid namespace and user; no process
// with its pid and start time) counts as an orphan.
func TestOwnerMarker(t *testing.T) {
	self, err := me()
	if err != nil {
		t.Fatal(err)
	}
	x, err := domainXML(domainParams{Name: "hvpt-1-1", Type: "qemu", MemoryMiB: 64, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	var dom struct {
		Metadata struct {
			Owner owner `xml:"owner"`
		} `xml:"metadata"`
	}
	if err := xml.Unmarshal([]byte(x), &dom); err != nil {
		t.Fatalf("domain XML does not parse: %v\n%s", err, x)
	}
	got := dom.Metadata.Owner
	got.XMLName = self.XMLName
	if got != self {
		t.Fatalf("marker in the XML %+v, want %+v", got, self)
	}
	if self.orphanOf(self) {
		t.Error("this process's own domain counted as an orphan")
	}

	parent := self
	parent.PID = os.Getppid()
	if parent.Start, err = processStart(parent.PID); err != nil {
		t.Fatal(err)
	}
	if parent.orphanOf(self) {
		t.Error("a domain of a live process counted as an orphan")
	}
	reused := parent
	reused.Start++ // the pid now belongs to a process started later
	if !reused.orphanOf(self) {
		t.Error("a domain whose creator's pid was reused was not counted as an orphan")
	}

	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := self
	dead.PID, dead.Start = cmd.Process.Pid, 1
	if _, err := processStart(dead.PID); err == nil {
		t.Skip("the pid of an exited child was reused at once")
	}
	if !dead.orphanOf(self) {
		t.Error("a domain of an exited process was not counted as an orphan")
	}
	for what, o := range map[string]owner{
		"another boot":          with(dead, func(o *owner) { o.Boot = "x" }),
		"another pid namespace": with(dead, func(o *owner) { o.PIDNS = "pid:[1]" }),
		"another user":          with(dead, func(o *owner) { o.UID++ }),
		"no marker":             {},
	} {
		if o.orphanOf(self) {
			t.Errorf("%s: counted as an orphan", what)
		}
	}
	if !strings.Contains(x, "<description>") {
		t.Error("no description in the domain XML")
	}
}

func with(o owner, f func(*owner)) owner { f(&o); return o }
