package hypervisor

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// DomainInfo is one line of the domain list.
type DomainInfo struct {
	Name  string `json:"name"`
	UUID  string `json:"uuid"`
	State string `json:"state"`
	ID    int    `json:"id"` // -1 when not running
}

// Domain is a handle on one libvirt domain. It stays valid across libvirtd
// reconnections (libvirt identifies domains by name and UUID).
type Domain struct {
	c   *Conn
	dom libvirt.Domain
	// QEMUPidDir holds libvirt's NAME.pid files (default /run/libvirt/qemu).
	QEMUPidDir string
	// GdbstubDir holds the private gdbstub sockets (default /run/hvpatch/gdbstub).
	GdbstubDir string
}

// Domains lists every domain libvirt knows, running or not.
func (c *Conn) Domains(ctx context.Context) ([]DomainInfo, error) {
	var doms []libvirt.Domain
	err := c.call(ctx, "listing domains", callOpts{}, func(lv *libvirt.Libvirt) error {
		var err error
		doms, _, err = lv.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsInactive)
		return err
	})
	if err != nil {
		return nil, err
	}
	infos := make([]DomainInfo, 0, len(doms))
	for _, dom := range doms {
		d := &Domain{c: c, dom: dom}
		st, err := d.State(ctx)
		if err != nil {
			continue // a transient domain that went away while we listed
		}
		id := int(dom.ID)
		if id <= 0 {
			id = -1
		}
		infos = append(infos, DomainInfo{Name: dom.Name, UUID: d.UUID(), State: st, ID: id})
	}
	return infos, nil
}

// LookupDomain finds a domain by name or UUID.
func (c *Conn) LookupDomain(ctx context.Context, nameOrUUID string) (*Domain, error) {
	var dom libvirt.Domain
	err := c.call(ctx, fmt.Sprintf("looking up domain %q", nameOrUUID), callOpts{}, func(lv *libvirt.Libvirt) error {
		var err error
		if u, ok := parseUUID(nameOrUUID); ok {
			if dom, err = lv.DomainLookupByUUID(u); err == nil {
				return nil
			}
		}
		dom, err = lv.DomainLookupByName(nameOrUUID)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &Domain{c: c, dom: dom}, nil
}

func parseUUID(s string) (libvirt.UUID, bool) {
	var u libvirt.UUID
	b, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(b) != len(u) || len(s) != 36 {
		return u, false
	}
	copy(u[:], b)
	return u, true
}

func formatUUID(u libvirt.UUID) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func (d *Domain) Name() string { return d.dom.Name }
func (d *Domain) UUID() string { return formatUUID(d.dom.UUID) }

// Conn is the connection the domain was looked up on.
func (d *Domain) Conn() *Conn { return d.c }

func (d *Domain) what(action string) string {
	return fmt.Sprintf("domain %s: %s", d.dom.Name, action)
}

var stateNames = map[libvirt.DomainState]string{
	libvirt.DomainNostate:     "nostate",
	libvirt.DomainRunning:     "running",
	libvirt.DomainBlocked:     "blocked",
	libvirt.DomainPaused:      "paused",
	libvirt.DomainShutdown:    "shutdown",
	libvirt.DomainShutoff:     "shutoff",
	libvirt.DomainCrashed:     "crashed",
	libvirt.DomainPmsuspended: "pmsuspended",
}

// State is libvirt's state of the domain: "running", "paused", "shutoff", …
func (d *Domain) State(ctx context.Context) (string, error) {
	var st int32
	err := d.c.call(ctx, d.what("getting state"), callOpts{}, func(lv *libvirt.Libvirt) error {
		var err error
		st, _, err = lv.DomainGetState(d.dom, 0)
		return err
	})
	if err != nil {
		return "", err
	}
	if s, ok := stateNames[libvirt.DomainState(st)]; ok {
		return s, nil
	}
	return fmt.Sprintf("state-%d", st), nil
}

// RunStatus is QEMU's own run state (QMP query-status: "running",
// "paused", "debug", …), current at the moment of the call, unlike State,
// which libvirt updates from asynchronous monitor events.
func (d *Domain) RunStatus(ctx context.Context) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := d.QMP(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// QEMUPid is the pid of the domain's QEMU process, from libvirt's pid file,
// checked against the process's command line.
func (d *Domain) QEMUPid(ctx context.Context) (int, error) {
	dir := d.QEMUPidDir
	if dir == "" {
		dir = "/run/libvirt/qemu"
	}
	path := filepath.Join(dir, d.dom.Name+".pid")
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("domain %s: QEMU pid file: %w (is the domain running?)", d.dom.Name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("domain %s: QEMU pid file %s holds %q, expected a pid", d.dom.Name, path, b)
	}
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return 0, fmt.Errorf("domain %s: QEMU process %d: %w", d.dom.Name, pid, err)
	}
	if !strings.Contains(string(cmd), "guest="+d.dom.Name) {
		return 0, fmt.Errorf("domain %s: process %d from %s is not this domain's QEMU", d.dom.Name, pid, path)
	}
	return pid, nil
}

// VCPUThreads lists the host thread ids of the vCPUs, in vCPU order
// (QMP query-cpus-fast). Under single-threaded TCG all vCPUs share one thread.
func (d *Domain) VCPUThreads(ctx context.Context) ([]int, error) {
	var cpus []struct {
		CPUIndex int `json:"cpu-index"`
		ThreadID int `json:"thread-id"`
	}
	if err := d.QMP(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return nil, err
	}
	if len(cpus) == 0 {
		return nil, fmt.Errorf("domain %s: query-cpus-fast lists no vCPUs", d.dom.Name)
	}
	tids := make([]int, len(cpus))
	for i, c := range cpus {
		tids[i] = c.ThreadID
	}
	return tids, nil
}

// Accel is "kvm" or "tcg" (QMP query-kvm).
func (d *Domain) Accel(ctx context.Context) (string, error) {
	var r struct {
		Enabled bool `json:"enabled"`
	}
	if err := d.QMP(ctx, "query-kvm", nil, &r); err != nil {
		return "", err
	}
	if r.Enabled {
		return "kvm", nil
	}
	return "tcg", nil
}

// HMP runs a human monitor command and returns its output with "\r\n"
// line ends turned into "\n".
func (d *Domain) HMP(ctx context.Context, cmd string) (string, error) {
	var out string
	err := d.c.call(ctx, d.what(fmt.Sprintf("HMP %q", cmd)), callOpts{}, func(lv *libvirt.Libvirt) error {
		var err error
		out, err = lv.QEMUDomainMonitorCommand(d.dom, cmd, 1)
		return err
	})
	return strings.ReplaceAll(out, "\r\n", "\n"), err
}

// QMPError is an error answer from QEMU's QMP.
type QMPError struct {
	Command, Class, Desc string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("QMP %s: %s: %s", e.Command, e.Class, e.Desc)
}

// QMP runs a QMP command; args (may be nil) is marshalled as "arguments" and
// the "return" value is unmarshalled into result (may be nil).
func (d *Domain) QMP(ctx context.Context, command string, args, result any) error {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("domain %s: QMP %s: %w", d.dom.Name, command, err)
	}
	var out string
	err = d.c.call(ctx, d.what("QMP "+command), callOpts{}, func(lv *libvirt.Libvirt) error {
		var err error
		out, err = lv.QEMUDomainMonitorCommand(d.dom, string(b), 0)
		return err
	})
	if err != nil {
		return err
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		return fmt.Errorf("domain %s: QMP %s: unparsable answer %q: %w", d.dom.Name, command, out, err)
	}
	if resp.Error != nil {
		return fmt.Errorf("domain %s: %w", d.dom.Name, &QMPError{command, resp.Error.Class, resp.Error.Desc})
	}
	if result != nil {
		if err := json.Unmarshal(resp.Return, result); err != nil {
			return fmt.Errorf("domain %s: QMP %s: unexpected answer %s: %w", d.dom.Name, command, resp.Return, err)
		}
	}
	return nil
}

// CPUs reads every vCPU's registers (HMP "info registers -a"). Live
// guests do not show MSR_KERNEL_GS_BASE there, so KernelGSBase is 0.
func (d *Domain) CPUs(ctx context.Context) ([]CPUState, error) {
	out, err := d.HMP(ctx, "info registers -a")
	if err != nil {
		return nil, err
	}
	cpus, err := parseRegisters(out)
	if err != nil {
		return nil, fmt.Errorf("domain %s: info registers: %w", d.dom.Name, err)
	}
	return cpus, nil
}

// MemoryMap lists guest RAM (HMP "info mtree -f", the "memory" address
// space), contiguous pieces merged.
func (d *Domain) MemoryMap(ctx context.Context) ([]Region, error) {
	ram, err := d.ramLayout(ctx)
	if err != nil {
		return nil, err
	}
	regs := make([]Region, len(ram))
	for i, r := range ram {
		regs[i] = r.Region
	}
	return regs, nil
}

func (d *Domain) ramLayout(ctx context.Context) ([]ramPiece, error) {
	out, err := d.HMP(ctx, "info mtree -f")
	if err != nil {
		return nil, err
	}
	ram, err := parseMtree(out)
	if err != nil {
		return nil, fmt.Errorf("domain %s: info mtree -f: %w", d.dom.Name, err)
	}
	return ram, nil
}

// Suspend and Resume pause and continue the domain through libvirt.
func (d *Domain) Suspend(ctx context.Context) error {
	return d.c.call(ctx, d.what("suspend"), callOpts{noRetry: true}, func(lv *libvirt.Libvirt) error {
		return lv.DomainSuspend(d.dom)
	})
}

func (d *Domain) Resume(ctx context.Context) error {
	return d.c.call(ctx, d.what("resume"), callOpts{}, func(lv *libvirt.Libvirt) error {
		return lv.DomainResume(d.dom)
	})
}

// MemoryPeek reads guest-physical memory through libvirt (virDomainMemoryPeek,
// at most 64 KiB a call here). It is slow; it is the reference the fast
// backends are compared and benchmarked against.
func (d *Domain) MemoryPeek(ctx context.Context, gpa uint64, p []byte) error {
	const maxChunk = 64 << 10
	for len(p) > 0 {
		n := min(len(p), maxChunk)
		var buf []byte
		err := d.c.call(ctx, d.what(fmt.Sprintf("memory peek at %#x", gpa)), callOpts{}, func(lv *libvirt.Libvirt) error {
			var err error
			buf, err = lv.DomainMemoryPeek(d.dom, gpa, uint32(n), libvirt.MemoryPhysical)
			return err
		})
		if err != nil {
			return err
		}
		if len(buf) != n {
			return fmt.Errorf("domain %s: memory peek at %#x returned %d bytes, expected %d", d.dom.Name, gpa, len(buf), n)
		}
		copy(p, buf)
		p, gpa = p[n:], gpa+uint64(n)
	}
	return nil
}

// DumpMemory writes an ELF core of guest memory (memory only, no paging
// information) to path, through libvirt. The file is written by libvirtd.
// It takes seconds per GiB, so it gets its own bound (10 minutes unless ctx
// says less).
func (d *Domain) DumpMemory(ctx context.Context, path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	return d.c.call(ctx, d.what("memory dump to "+abs), callOpts{timeout: 10 * time.Minute, noRetry: true}, func(lv *libvirt.Libvirt) error {
		return lv.DomainCoreDumpWithFormat(d.dom, abs, uint32(libvirt.DomainCoreDumpFormatRaw), libvirt.DumpMemoryOnly)
	})
}
