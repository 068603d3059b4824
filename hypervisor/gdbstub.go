package hypervisor

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// gdbConn speaks the GDB remote serial protocol to QEMU's gdbstub.
type gdbConn struct {
	path    string
	c       net.Conn
	r       *bufio.Reader
	timeout time.Duration
}

func (g *gdbConn) send(pkt string) error {
	var sum byte
	for i := 0; i < len(pkt); i++ {
		sum += pkt[i]
	}
	g.c.SetDeadline(time.Now().Add(g.timeout))
	_, err := fmt.Fprintf(g.c, "$%s#%02x", pkt, sum)
	return err
}

// recv reads one packet, skipping acknowledgements, and acknowledges it.
func (g *gdbConn) recv() (string, error) {
	g.c.SetDeadline(time.Now().Add(g.timeout))
	for {
		b, err := g.r.ReadByte()
		if err != nil {
			return "", err
		}
		switch b {
		case '+':
			continue
		case '-':
			return "", errors.New("gdbstub asked for a retransmission")
		case '$':
		default:
			continue
		}
		data, err := g.r.ReadString('#')
		if err != nil {
			return "", err
		}
		data = data[:len(data)-1]
		var cs [2]byte
		if _, err := g.r.Read(cs[:1]); err != nil {
			return "", err
		}
		if _, err := g.r.Read(cs[1:]); err != nil {
			return "", err
		}
		var sum byte
		for i := 0; i < len(data); i++ {
			sum += data[i]
		}
		if fmt.Sprintf("%02x", sum) != strings.ToLower(string(cs[:])) {
			return "", fmt.Errorf("gdbstub packet with a bad checksum")
		}
		if _, err := g.c.Write([]byte{'+'}); err != nil {
			return "", err
		}
		return data, nil
	}
}

// cmd sends a request and returns its answer. Stop replies ("T…", "S…")
// are never answers to the requests used here; a queued one (QEMU sends an
// extra stop reply after the first "?") is skipped.
func (g *gdbConn) cmd(pkt string) (string, error) {
	if err := g.send(pkt); err != nil {
		return "", err
	}
	for {
		r, err := g.recv()
		if err != nil {
			return "", err
		}
		if len(r) > 0 && (r[0] == 'T' || r[0] == 'S') {
			continue
		}
		return r, nil
	}
}

// gdbWriter changes guest memory through QEMU's gdbstub, which writes with
// the guest's own MMU and drops translated code (needed under TCG).
type gdbWriter struct {
	d     *Domain
	vcpus int
	guard *gdbGuard // resumes the VM if this process dies mid-session
	// pending delivers the result of the last session's check that QEMU
	// runs the VM again; nil when there is none.
	pending chan error
}

func (w *gdbWriter) Name() string { return WriterGdbstub }

// Capabilities: the gdbstub stops the VM as the monitor does (vm_stop), so
// the monitor may read registers; the stop outlives this process until its
// guard detaches.
func (w *gdbWriter) Capabilities() Capabilities {
	return Capabilities{Registers: true, OutlivesProcess: true}
}

func (d *Domain) gdbSocket() (string, error) {
	dir := d.GdbstubDir
	if dir == "" {
		dir = "/run/hvpatch/gdbstub"
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return "", err
	}
	return filepath.Join(dir, d.UUID()+".sock"), nil
}

// dialGdbstub connects to the domain's gdbstub, starting it (once per QEMU
// process) on a private unix socket when nothing listens there.
func (d *Domain) dialGdbstub(ctx context.Context, path string) (net.Conn, error) {
	if c, err := net.DialTimeout("unix", path, 2*time.Second); err == nil {
		return c, nil
	}
	os.Remove(path)
	out, err := d.HMP(ctx, fmt.Sprintf("gdbserver unix:%s,server=on,wait=off", path))
	if err != nil {
		return nil, err
	}
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("domain %s: gdbstub at %s: %v (monitor said %q)", d.Name(), path, err, strings.TrimSpace(out))
	}
	return c, nil
}

func (w *gdbWriter) Stop(ctx context.Context) (StoppedGuest, error) {
	// The previous session's check that the VM runs again comes first.
	if err := w.settle(); err != nil {
		return nil, err
	}
	// Detaching resumes the VM, so a paused domain would be resumed. QEMU
	// itself is asked: libvirt's state lags a few milliseconds behind QEMU's
	// after a resume or a gdbstub detach. This is before the stop, outside
	// the window.
	st, err := w.d.RunStatus(ctx)
	if err != nil {
		return nil, err
	}
	if st != "running" {
		return nil, fmt.Errorf("domain %s is %s: the gdbstub writer would resume it; resume it first", w.d.Name(), st)
	}
	path, err := w.d.gdbSocket()
	if err != nil {
		return nil, fmt.Errorf("domain %s: gdbstub socket directory: %w", w.d.Name(), err)
	}
	if w.guard == nil {
		if w.guard, err = startGdbGuard(path, w.d); err != nil {
			return nil, fmt.Errorf("domain %s: %w", w.d.Name(), err)
		}
	}
	if err := w.guard.set(true); err != nil {
		w.guard = nil // a new one next time
		return nil, fmt.Errorf("domain %s: %w", w.d.Name(), err)
	}
	start := time.Now()
	c, err := w.d.dialGdbstub(ctx, path)
	if err != nil {
		w.guard.set(false)
		return nil, err
	}
	g := &gdbConn{c: c, r: bufio.NewReader(c), timeout: 5 * time.Second, path: path}
	// The VM stops when the debugger connects: QEMU's main loop runs the
	// connection's open event, whose handler stops the VM synchronously
	// (vm_stop from the main thread waits until every vCPU is paused),
	// before it reads a byte from the connection. So a stop reply to "?"
	// means the VM is stopped, and the monitor is not asked on this path
	// (a query-status round trip through libvirt costs about as much as the
	// whole stop). Any other answer is the failure path: QEMU is asked.
	err = g.send("?")
	var r string
	if err == nil {
		r, err = g.recv()
	}
	if err != nil {
		// Only one debugger at a time: callers serialise sessions per
		// domain (the daemon does), so this is QEMU failing us, and the
		// VM may already be stopped: detach on a fresh connection.
		c.Close()
		if derr := gdbDetach(path, 10); derr != nil {
			err = fmt.Errorf("%w; %v", err, derr)
		} else {
			w.guard.set(false)
		}
		return nil, fmt.Errorf("domain %s: gdbstub handshake: %w", w.d.Name(), err)
	}
	if r == "" || (r[0] != 'T' && r[0] != 'S') {
		if st, err := w.d.RunStatus(ctx); err != nil || st == "running" {
			s := &gdbStopped{w: w, g: g, start: start}
			s.Resume()
			if err == nil {
				err = fmt.Errorf("gdbstub answered %q to \"?\" and QEMU reports the VM %s", r, st)
			}
			return nil, fmt.Errorf("domain %s: %w", w.d.Name(), err)
		}
	}
	return &gdbStopped{w: w, g: g, start: start}, nil
}

// settle waits for the previous session's check that the VM runs again
// (see gdbStopped.Resume) and returns its error.
func (w *gdbWriter) settle() error {
	if w.pending == nil {
		return nil
	}
	err := <-w.pending
	w.pending = nil
	return err
}

// Settle waits until the last session's resume is confirmed by QEMU (a
// detach was once seen to leave a VM paused; the check runs after Resume
// returns, and resumes the VM if needed). Stop does it first; a process
// about to exit may call it so that its guard has nothing left to do.
func (w *gdbWriter) Settle() error { return w.settle() }

type gdbStopped struct {
	w     *gdbWriter
	g     *gdbConn
	start time.Time
	done  bool
}

// gdbChunk keeps packets below QEMU's 4 KiB packet buffer.
const gdbChunk = 1024

func (s *gdbStopped) Read(va, gpa uint64, p []byte) error {
	for off := 0; off < len(p); off += gdbChunk {
		n := min(gdbChunk, len(p)-off)
		r, err := s.withAnyCPU(va+uint64(off), fmt.Sprintf("m%x,%x", va+uint64(off), n))
		if err != nil {
			return fmt.Errorf("domain %s: gdbstub read of %d bytes at %#x: %w", s.w.d.Name(), n, va+uint64(off), err)
		}
		b, err := hex.DecodeString(r)
		if err != nil || len(b) != n {
			return fmt.Errorf("domain %s: gdbstub read at %#x: answer %q is not %d bytes of hex", s.w.d.Name(), va+uint64(off), r, n)
		}
		copy(p[off:], b)
	}
	return nil
}

func (s *gdbStopped) Write(va, gpa uint64, data []byte) error {
	for off := 0; off < len(data); off += gdbChunk {
		n := min(gdbChunk, len(data)-off)
		a := va + uint64(off)
		r, err := s.withAnyCPU(a, fmt.Sprintf("M%x,%x:%s", a, n, hex.EncodeToString(data[off:off+n])))
		if err == nil && r != "OK" {
			err = fmt.Errorf("answer %q", r)
		}
		if err != nil {
			return fmt.Errorf("domain %s: gdbstub write of %d bytes at %#x: %w", s.w.d.Name(), n, a, err)
		}
	}
	return nil
}

// withAnyCPU runs a memory request on the current vCPU and, if its page
// tables do not map va (a vCPU in user mode under PTI), on the others.
func (s *gdbStopped) withAnyCPU(va uint64, pkt string) (string, error) {
	r, err := s.g.cmd(pkt)
	if err != nil || !strings.HasPrefix(r, "E") {
		return r, err
	}
	for cpu := 1; cpu <= s.w.vcpus; cpu++ {
		if sel, err := s.g.cmd(fmt.Sprintf("Hg%x", cpu)); err != nil || sel != "OK" {
			continue
		}
		if r2, err := s.g.cmd(pkt); err != nil || !strings.HasPrefix(r2, "E") {
			return r2, err
		}
	}
	return "", fmt.Errorf("no vCPU maps %#x (gdbstub %s)", va, r)
}

// Registers asks the monitor, which answers while the gdbstub holds the VM.
func (s *gdbStopped) Registers(ctx context.Context) ([]CPUState, error) { return s.w.d.CPUs(ctx) }

func (s *gdbStopped) Resume() (FreezeReport, error) {
	if s.done {
		return FreezeReport{}, errors.New("already resumed")
	}
	s.done = true
	defer s.g.c.Close()
	r, err := s.g.cmd("D")
	rep := FreezeReport{Window: time.Since(s.start), Method: "gdbstub", VCPUs: s.w.vcpus}
	if err == nil && r != "OK" {
		err = fmt.Errorf("answer %q", r)
	}
	if err != nil {
		s.g.c.Close()
		if derr := gdbDetach(s.g.path, 10); derr != nil {
			return rep, fmt.Errorf("domain %s: gdbstub detach: %w; %v", s.w.d.Name(), err, derr)
		}
		err = s.ensureRunning()
		rep.Window = time.Since(s.start)
		s.w.guard.set(false)
		if err != nil {
			return rep, fmt.Errorf("domain %s: gdbstub detach: %w", s.w.d.Name(), err)
		}
		return rep, nil
	}
	// The detach answered OK: QEMU resumed the VM before answering. That
	// it really runs is checked off the window, on a goroutine: the guard
	// stays armed until the check is done (this process dying first, the
	// guard detaches and resumes), and the writer's next Stop, or Settle,
	// waits for it and reports its error.
	done := make(chan error, 1)
	s.w.pending = done
	go func() {
		err := s.ensureRunning()
		if err == nil {
			err = s.w.guard.set(false)
		}
		if err != nil {
			err = fmt.Errorf("domain %s: after the gdbstub detach: %w", s.w.d.Name(), err)
		}
		done <- err
	}()
	return rep, nil
}

// ensureRunning makes sure the detach resumed the VM. On a 1-vCPU TCG
// guest QEMU 7.2 was seen to answer the detach with OK and stay paused
// (when the stop from the connection completed after the detach's
// continue). The VM was running when Stop began and the patch lock keeps
// other writers out, so resuming it is what the caller expects.
func (s *gdbStopped) ensureRunning() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.w.d.runIfStopped(ctx)
}

// runIfStopped resumes the VM (QMP cont) when QEMU reports it stopped.
func (d *Domain) runIfStopped(ctx context.Context) error {
	st, err := d.RunStatus(ctx)
	if err != nil || st == "running" {
		return err
	}
	if err := d.QMP(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("VM left %s after detach and cont failed: %w", st, err)
	}
	if st, err = d.RunStatus(ctx); err == nil && st != "running" {
		err = fmt.Errorf("VM still %s after detach and cont", st)
	}
	return err
}
