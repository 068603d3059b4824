package testguest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	libvirt "github.com/digitalocean/go-libvirt"
)

// Every test domain carries an owner marker in its libvirt metadata: the
// process that created it, identified so that it cannot be mistaken for
// another (pid and that process's start time, the host's boot id, the pid
// namespace, the uid, a random run token). Clean-up destroys a domain only
// when its marker proves it was a test guest of a process of this host boot,
// in this pid namespace and of this user, that is gone now. Domains without
// the marker (anyone else's, whatever their name) are never touched.

// ownerNS is the XML namespace of the marker in the domain's metadata.
const ownerNS = "https://github.com/hvpatch/hvpatch/internal/testguest"

type owner struct {
	XMLName xml.Name `xml:"owner"`
	PID     int      `xml:"pid,attr"`
	Start   uint64   `xml:"start,attr"` // process start, clock ticks after boot (/proc/PID/stat)
	Boot    string   `xml:"boot,attr"`  // /proc/sys/kernel/random/boot_id
	PIDNS   string   `xml:"pidns,attr"` // /proc/self/ns/pid link
	UID     int      `xml:"uid,attr"`
	Run     string   `xml:"run,attr"` // random, per test process
}

var (
	selfOnce  sync.Once
	selfOwner owner
	selfErr   error
)

// me is this process's marker.
func me() (owner, error) {
	selfOnce.Do(func() {
		o := owner{PID: os.Getpid(), UID: os.Getuid()}
		var err error
		if o.Start, err = processStart(o.PID); err != nil {
			selfErr = err
			return
		}
		b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
		if err != nil {
			selfErr = err
			return
		}
		o.Boot = strings.TrimSpace(string(b))
		if o.PIDNS, err = os.Readlink("/proc/self/ns/pid"); err != nil {
			selfErr = err
			return
		}
		r := make([]byte, 8)
		rand.Read(r)
		o.Run = hex.EncodeToString(r)
		selfOwner = o
	})
	return selfOwner, selfErr
}

// metadata is the marker as a libvirt <metadata> child element.
func (o owner) metadata() string {
	esc := func(s string) string {
		var b strings.Builder
		xml.EscapeText(&b, []byte(s))
		return strings.ReplaceAll(b.String(), `"`, "&#34;")
	}
	return fmt.Sprintf(`<hvpt:owner xmlns:hvpt="%s" pid="%d" start="%d" boot="%s" pidns="%s" uid="%d" run="%s"/>`,
		ownerNS, o.PID, o.Start, esc(o.Boot), esc(o.PIDNS), o.UID, esc(o.Run))
}

// orphanOf tells whether o marks a test domain whose creator is provably
// gone: same host boot, pid namespace and user as self, another process,
// and no process with that pid and start time exists.
func (o owner) orphanOf(self owner) bool {
	if o.PID <= 0 || o.Boot == "" || o.Boot != self.Boot || o.PIDNS != self.PIDNS || o.UID != self.UID {
		return false
	}
	if o.PID == self.PID && o.Start == self.Start {
		return false // ours, alive: its own cleanup destroys it
	}
	start, err := processStart(o.PID)
	if err == nil {
		return start != o.Start // the pid was reused by another process
	}
	return os.IsNotExist(err)
}

// processStart reads a process's start time (field 22 of /proc/PID/stat).
func processStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command name may hold spaces and parentheses
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	f := strings.Fields(s[i+1:]) // from field 3 (state) on
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// domainOwner reads a domain's marker; ok is false when it has none.
func domainOwner(lv *libvirt.Libvirt, d libvirt.Domain) (owner, bool) {
	md, err := lv.DomainGetMetadata(d, int32(libvirt.DomainMetadataElement), libvirt.OptString{ownerNS}, libvirt.DomainAffectLive)
	if err != nil {
		return owner{}, false
	}
	var o owner
	if err := xml.Unmarshal([]byte(md), &o); err != nil || o.XMLName.Local != "owner" {
		return owner{}, false
	}
	return o, true
}

// removeStaleDomains destroys the test domains whose marker proves that the
// process that created them is gone (see owner). Nothing else is touched.
func removeStaleDomains(lv *libvirt.Libvirt) {
	self, err := me()
	if err != nil {
		return
	}
	doms, _, err := lv.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive)
	if err != nil {
		return
	}
	for _, d := range doms {
		if !strings.HasPrefix(d.Name, "hvpt-") {
			continue // cheap filter only: the marker is the proof
		}
		if o, ok := domainOwner(lv, d); ok && o.orphanOf(self) {
			lv.DomainDestroy(d)
		}
	}
}
