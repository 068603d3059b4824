package hypervisor

import (
	"bufio"
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

const gdbGuardEnv = "HVPATCH_GDBSTUB_GUARD"

func init() {
	if path := os.Getenv(gdbGuardEnv); path != "" {
		os.Exit(runGdbGuard(path, os.Stdin))
	}
}

// runGdbGuard reads "armed"/"disarmed" lines; at end of input while armed
// it detaches the debugger so the VM runs again.
func runGdbGuard(path string, in io.Reader) int {
	armed := false
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		armed = sc.Text() == "armed"
	}
	if !armed {
		return 0
	}
	if err := gdbDetach(path, 50); err != nil {
		fmt.Fprintf(os.Stderr, "hvpatch gdbstub guard: %v; the guest stays paused\n", err)
		return 1
	}
	return 0
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

func startGdbGuard(path string) (*gdbGuard, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), gdbGuardEnv+"="+path)
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
