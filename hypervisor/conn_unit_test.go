package hypervisor

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// safetyBound is how much longer than its own timeout anything timed may
// take before a test calls it hung: generous, for a loaded shared host.
const safetyBound = 15 * time.Second

// TestConnectAbortsHungDial: a libvirtd that accepts and never answers;
// Connect gives up after its timeout and closes the socket it opened (the
// abort and go-libvirt's dial run concurrently: run with -race). Hermetic:
// the "libvirtd" is a listener in the test's temporary directory.
func TestConnectAbortsHungDial(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hung.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	closed := make(chan struct{}, 64)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { // read until the client closes its end
				defer wg.Done()
				io.Copy(io.Discard, c)
				c.Close()
				closed <- struct{}{}
			}()
		}
	}()
	defer func() { l.Close(); wg.Wait() }()
	const timeout = 100 * time.Millisecond
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		c, err := Connect(context.Background(), Config{Socket: path, Timeout: timeout})
		if err == nil {
			c.Close()
			t.Fatal("Connect to a libvirtd that never answers succeeded")
		}
		if !strings.Contains(err.Error(), "no answer") {
			t.Errorf("error %v, want it to say there was no answer", err)
		}
		if took := time.Since(t0); took > timeout+safetyBound {
			t.Errorf("Connect took %v with a %v timeout", took, timeout)
		}
		select {
		case <-closed: // the aborted socket was closed, not leaked
		case <-time.After(safetyBound):
			t.Fatal("the socket of the aborted connect stays open")
		}
	}
}

// TestDialerAbortBeforeDial: an abort that comes before the socket exists
// closes it as soon as it is opened.
func TestDialerAbortBeforeDial(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	d := &dialer{path: path, timeout: time.Second}
	d.abort()
	if c, err := d.Dial(); err == nil {
		c.Close()
		t.Fatal("Dial after abort returned a connection")
	}
	if d.socket() != nil {
		t.Fatal("an aborted dialer kept its socket")
	}
}
