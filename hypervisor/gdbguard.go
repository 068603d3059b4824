package hypervisor

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"time"
)

// QEMU stops the VM when a debugger connects and runs it again only on an
// explicit detach: if this process died mid-session, the guest would stay
// paused. A guard process (this same executable, re-run with
// gdbGuardEnv set) watches a pipe from us; when the pipe closes while a
// session is open, it connects to the gdbstub itself and detaches.

const (
	gdbGuardEnv       = "HVPATCH_GDBSTUB_GUARD"
	gdbGuardDomainEnv = "HVPATCH_GDBSTUB_GUARD_DOMAIN" // UUID
	gdbGuardSocketEnv = "HVPATCH_GDBSTUB_GUARD_LIBVIRT"
)

func init() {
	if path := os.Getenv(gdbGuardEnv); path != "" {
		os.Exit(runGdbGuard(path, os.Getenv(gdbGuardDomainEnv), os.Getenv(gdbGuardSocketEnv), os.Stdin))
	}
}

// runGdbGuard reads "armed"/"disarmed" lines; at end of input while armed
// it detaches the debugger and then makes sure QEMU runs the VM again
// (a detach alone can leave it paused: see gdbStopped.ensureRunning).
func runGdbGuard(path, domain, socket string, in io.Reader) int {
	armed := false
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		armed = sc.Text() == "armed"
	}
	if !armed {
		return 0
	}
	if err := gdbDetach(path, 50); err != nil {
		fmt.Fprintf(os.Stderr, "hvpatch gdbstub guard: %v\n", err)
	}
	if err := resumeDomain(domain, socket); err != nil {
		fmt.Fprintf(os.Stderr, "hvpatch gdbstub guard: domain %s: %v; the guest may stay paused\n", domain, err)
		return 1
	}
	return 0
}

// resumeDomain connects to libvirt on its own and resumes the domain if
// QEMU reports it stopped.
func resumeDomain(uuid, socket string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Connect(ctx, Config{Socket: socket})
	if err != nil {
		return err
	}
	defer c.Close()
	d, err := c.LookupDomain(ctx, uuid)
	if err != nil {
		return err
	}
	return d.runIfStopped(ctx)
}

// gdbDetach connects to the gdbstub at path and detaches, which makes QEMU
// run the VM again.
func gdbDetach(path string, tries int) error {
	var err error
	for try := 0; try < tries; try++ {
		var c net.Conn
		if c, err = net.DialTimeout("unix", path, time.Second); err == nil {
			g := &gdbConn{c: c, r: bufio.NewReader(c), timeout: 5 * time.Second}
			var r string
			r, err = g.cmd("D")
			c.Close()
			if err == nil && r == "OK" {
				return nil
			}
			if err == nil {
				err = fmt.Errorf("detach answered %q", r)
			}
		}
		time.Sleep(100 * time.Millisecond) // QEMU may not have seen the old client go yet
	}
	return fmt.Errorf("could not detach from the gdbstub at %s: %w", path, err)
}

// gdbGuard is our end of the pipe to a guard process.
type gdbGuard struct {
	mu  sync.Mutex
	w   *os.File
	err error
}

func startGdbGuard(path string, d *Domain) (*gdbGuard, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), gdbGuardEnv+"="+path, gdbGuardDomainEnv+"="+d.UUID(), gdbGuardSocketEnv+"="+d.c.Config().Socket)
	cmd.Stdin = r
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("starting the gdbstub guard (%s): %w", exe, err)
	}
	r.Close()
	go cmd.Wait() // reap it whenever it ends
	return &gdbGuard{w: w}, nil
}

func (g *gdbGuard) set(armed bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.err != nil {
		return g.err
	}
	line := "disarmed\n"
	if armed {
		line = "armed\n"
	}
	if _, err := g.w.WriteString(line); err != nil {
		g.err = fmt.Errorf("gdbstub guard is gone: %w", err)
	}
	return g.err
}
