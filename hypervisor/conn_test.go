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

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// sockProxy stands between hvpatch and libvirtd so tests can cut the
// connection (what a libvirtd restart does to its clients) or make
// libvirtd look hung, without touching the shared system libvirtd.
type sockProxy struct {
	path    string
	target  string
	l       net.Listener
	mu      sync.Mutex
	conns   []net.Conn
	accepts int
	stalled bool // swallow client requests and never answer
}

func newSockProxy(t *testing.T, target string) *sockProxy {
	p := &sockProxy{path: filepath.Join(t.TempDir(), "libvirt-proxy.sock"), target: target}
	l, err := net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	p.l = l
	t.Cleanup(func() { l.Close(); p.cut() })
	go p.serve()
	return p
}

func (p *sockProxy) serve() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.accepts++
		p.conns = append(p.conns, c)
		stalled := p.stalled
		p.mu.Unlock()
		if stalled {
			go io.Copy(io.Discard, c)
			continue
		}
		up, err := net.Dial("unix", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, up)
		p.mu.Unlock()
		go func() { p.pipe(up, c) }()
		go func() { io.Copy(c, up); c.Close() }()
	}
}

// pipe forwards client→libvirtd unless the proxy is stalled.
func (p *sockProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		p.mu.Lock()
		stalled := p.stalled
		p.mu.Unlock()
		if n > 0 && !stalled {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (p *sockProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *sockProxy) setStalled(s bool) {
	p.mu.Lock()
	p.stalled = s
	p.mu.Unlock()
}

func (p *sockProxy) acceptCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepts
}

func libvirtdOrFail(t *testing.T) {
	testguest.Need(t) // skips with -short; otherwise makes sure libvirtd runs
}

// waitNoticed waits until c's client has seen its connection go (as after
// a libvirtd restart), within a generous safety bound.
func waitNoticed(t *testing.T, c *Conn) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		c.mu.Lock()
		up := c.lv != nil && c.lv.IsConnected()
		c.mu.Unlock()
		if !up {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the client did not notice the cut connection within 30 s")
		}
	}
}

// TestReconnect: the connection under a Conn is cut, as a libvirtd restart
// cuts it; the next call must redial and succeed.
func TestReconnect(t *testing.T) {
	libvirtdOrFail(t)
	p := newSockProxy(t, testguest.LibvirtSocket())
	ctx := context.Background()
	c, err := Connect(ctx, Config{Socket: p.path, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before, err := c.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		p.cut()
		waitNoticed(t, c) // as after a restart
		if _, err := c.Domains(ctx); err != nil {
			t.Fatalf("call after cut %d: %v", i, err)
		}
		if c.Dials() != i+1 || p.acceptCount() != i+1 {
			t.Fatalf("after cut %d: %d dials, %d proxy connections; want %d", i, c.Dials(), p.acceptCount(), i+1)
		}
	}
	// A cut that the client has not noticed yet: the call in flight fails
	// with "interrupted", and the retry goes through a new connection.
	p.cut()
	if _, err := c.Domains(ctx); err != nil {
		t.Fatalf("call right after a cut: %v", err)
	}
	t.Logf("%d domains before, %d dials in all", len(before), c.Dials())
}

// TestHungLibvirtd: libvirtd accepts but never answers. Calls must fail
// within the configured timeout, and work again once it answers.
func TestHungLibvirtd(t *testing.T) {
	libvirtdOrFail(t)
	p := newSockProxy(t, testguest.LibvirtSocket())
	ctx := context.Background()
	const timeout = 700 * time.Millisecond
	c, err := Connect(ctx, Config{Socket: p.path, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.setStalled(true)
	t0 := time.Now()
	_, err = c.Domains(ctx)
	took := time.Since(t0)
	if err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("call to a hung libvirtd: err = %v, want a timeout", err)
	}
	// Bounded, not fast: a generous safety bound on a loaded host.
	if took > timeout+safetyBound {
		t.Errorf("timed-out call took %v, bound is %v", took, timeout)
	}
	t0 = time.Now()
	if _, err := Connect(ctx, Config{Socket: p.path, Timeout: timeout}); err == nil {
		t.Fatal("Connect to a hung libvirtd succeeded")
	} else if time.Since(t0) > timeout+safetyBound {
		t.Errorf("Connect to a hung libvirtd took %v, bound is %v", time.Since(t0), timeout)
	}
	p.setStalled(false)
	// The shared libvirtd is busy with other tests' guests (and, on a busy
	// host, with other VMs): a call may miss the short bound for a while,
	// so keep trying within a generous safety bound.
	deadline := time.Now().Add(safetyBound + time.Minute)
	for {
		_, err := c.Domains(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("call after libvirtd answers again: %v", err)
		}
	}
	t.Logf("timed-out call returned after %v (bound %v)", took, timeout)
}
