package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// Config says how to reach libvirtd.
type Config struct {
	URI     string        // libvirt driver URI; default qemu:///system
	Socket  string        // libvirtd's unix socket; default /run/libvirt/libvirt-sock
	Timeout time.Duration // bound on every libvirt call; default 10s
}

const (
	DefaultURI     = "qemu:///system"
	DefaultSocket  = "/run/libvirt/libvirt-sock"
	DefaultTimeout = 10 * time.Second
)

func (c Config) withDefaults() Config {
	if c.URI == "" {
		c.URI = DefaultURI
	}
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	return c
}

// Conn is a connection to libvirtd. go-libvirt has no timeouts of its own, so
// every call runs under a deadline, and a call that misses it closes the
// socket under the client (which fails every pending request) rather than
// leaving a goroutine blocked forever. A lost connection (libvirtd restarted,
// socket cut, call timed out) is redialled on the next call.
type Conn struct {
	cfg Config

	mu     sync.Mutex
	lv     *libvirt.Libvirt
	sock   net.Conn // the socket under lv, closed to abort hung calls
	closed bool
	dials  int // successful connections so far, for tests and diagnostics
}

// Connect dials libvirtd and opens cfg.URI.
func Connect(ctx context.Context, cfg Config) (*Conn, error) {
	c := &Conn{cfg: cfg.withDefaults()}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	if _, err := c.client(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Config returns the effective configuration (defaults filled in).
func (c *Conn) Config() Config { return c.cfg }

// Close disconnects. Domains obtained from c stop working.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.lv == nil {
		return nil
	}
	lv, sock := c.lv, c.sock
	c.lv, c.sock = nil, nil
	if !lv.IsConnected() {
		sock.Close()
		return nil
	}
	done := make(chan error, 1)
	go func() { done <- lv.Disconnect() }()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("disconnecting from libvirtd at %s: %w", c.cfg.Socket, err)
		}
		return nil
	case <-time.After(c.cfg.Timeout):
		sock.Close()
		return fmt.Errorf("disconnecting from libvirtd at %s: no answer within %v", c.cfg.Socket, c.cfg.Timeout)
	}
}

// dialer remembers the socket it opened so a hung connect can be aborted.
// Dial runs in go-libvirt's goroutine while client may abort from its own:
// mu orders them, and a socket opened after an abort is closed at once.
type dialer struct {
	path    string
	timeout time.Duration

	mu      sync.Mutex
	conn    net.Conn
	aborted bool
}

func (d *dialer) Dial() (net.Conn, error) {
	conn, err := net.DialTimeout("unix", d.path, d.timeout)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if d.aborted {
		conn.Close()
		return nil, net.ErrClosed
	}
	d.conn = conn
	return conn, nil
}

// abort closes the socket, now or as soon as it is opened.
func (d *dialer) abort() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.aborted = true
	if d.conn != nil {
		d.conn.Close()
	}
}

// socket is the connection Dial opened, nil if none.
func (d *dialer) socket() net.Conn {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.conn
}

// client returns a connected client, dialling if there is none or the last
// one lost its connection.
func (c *Conn) client(ctx context.Context) (*libvirt.Libvirt, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("libvirt connection is closed")
	}
	if c.lv != nil && c.lv.IsConnected() {
		return c.lv, nil
	}
	if c.sock != nil {
		c.sock.Close()
		c.lv, c.sock = nil, nil
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(c.cfg.Timeout)
	}
	d := &dialer{path: c.cfg.Socket, timeout: time.Until(deadline)}
	lv := libvirt.NewWithDialer(d)
	done := make(chan error, 1)
	go func() { done <- lv.ConnectToURI(libvirt.ConnectURI(c.cfg.URI)) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		d.abort()
		<-done
		err = fmt.Errorf("no answer: %w", ctx.Err())
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to libvirtd at %s (%s): %w", c.cfg.Socket, c.cfg.URI, err)
	}
	c.lv, c.sock = lv, d.socket()
	c.dials++
	return lv, nil
}

// drop forgets lv if it is still the current client and closes its socket.
func (c *Conn) drop(lv *libvirt.Libvirt) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lv == lv && c.sock != nil {
		c.sock.Close()
		c.lv, c.sock = nil, nil
	}
}

// Dials reports how many times the connection was (re)established.
func (c *Conn) Dials() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dials
}

// callOpts tune one libvirt call.
type callOpts struct {
	timeout time.Duration // overrides Config.Timeout when set
	noRetry bool          // the call has effects: never send it twice
}

// call runs f against libvirtd under the call deadline. If the connection
// was found broken (libvirtd restarted), it reconnects and, for calls
// without side effects, retries once.
func (c *Conn) call(ctx context.Context, what string, o callOpts, f func(lv *libvirt.Libvirt) error) error {
	timeout := c.cfg.Timeout
	if o.timeout > 0 {
		timeout = o.timeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		lv, err := c.client(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		done := make(chan error, 1)
		go func() { done <- f(lv) }()
		select {
		case err = <-done:
		case <-ctx.Done():
			c.drop(lv) // unblocks f: pending requests fail when the socket closes
			return fmt.Errorf("%s: libvirtd did not answer within %v", what, timeout)
		}
		if err == nil {
			return nil
		}
		if lost(lv, err) {
			c.drop(lv)
			if attempt == 0 && !o.noRetry {
				continue
			}
			return fmt.Errorf("%s: connection to libvirtd lost: %w", what, err)
		}
		return fmt.Errorf("%s: %w", what, err)
	}
}

// lost tells whether err means the connection broke rather than libvirtd
// refusing the request.
func lost(lv *libvirt.Libvirt, err error) bool {
	if !lv.IsConnected() || errors.Is(err, libvirt.ErrInterrupted) || errors.Is(err, net.ErrClosed) {
		return true
	}
	s := err.Error()
	return strings.Contains(s, "broken pipe") || strings.Contains(s, "connection reset")
}
