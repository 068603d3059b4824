package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/patchsign"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

// defaultDaemonSocket is where hvpatchd listens unless configured otherwise.
const defaultDaemonSocket = "/run/hvpatch/hvpatchd.sock"

func daemonSocketDefault() string {
	if s := os.Getenv("HVPATCH_DAEMON_SOCKET"); s != "" {
		return s
	}
	return defaultDaemonSocket
}

// daemonClient talks to hvpatchd's API on its unix socket.
type daemonClient struct {
	socket string
	hc     *http.Client
}

// daemon returns a client of the running hvpatchd, or nil when the command
// should run standalone: --standalone, or no daemon at the socket (absent,
// or left behind by a daemon that died). A socket this user may not use is
// an error, not a silent fallback: the daemon is there, access is refused.
func (a *app) daemon() (*daemonClient, error) {
	if a.standalone {
		return nil, nil
	}
	if a.client != nil {
		return a.client, nil
	}
	c, err := net.DialTimeout("unix", a.daemonSocket, 2*time.Second)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, nil
		}
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
			return nil, fmt.Errorf("hvpatchd socket %s: permission denied (its group may use it; --standalone runs without the daemon)", a.daemonSocket)
		}
		return nil, fmt.Errorf("hvpatchd socket %s: %w", a.daemonSocket, err)
	}
	c.Close()
	path := a.daemonSocket
	timeout := a.daemonTimeout
	if timeout <= 0 {
		timeout = defaultDaemonTimeout
	}
	// Every request is bounded as a whole (a daemon that accepts and never
	// answers, or stops answering half-way, must not hang the CLI).
	client := &daemonClient{socket: path, hc: &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			d := net.Dialer{Timeout: daemonDialTimeout}
			return d.DialContext(ctx, "unix", path)
		},
		ResponseHeaderTimeout: timeout,
	}}}
	// A daemon that is there but does not answer (stopped, wedged) is
	// found out quickly, before a long request is sent.
	ctx, cancel := context.WithTimeout(context.Background(), min(timeout, daemonHealthTimeout))
	defer cancel()
	var h struct {
		PID int `json:"pid"`
	}
	if err := client.get(ctx, "/health", nil, &h); err != nil {
		// Whichever bound fires first (the health check's, or the
		// transport's wait for response headers), it is a daemon that
		// does not answer.
		var ne net.Error
		if ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
			return nil, fmt.Errorf("hvpatchd at %s does not answer within %v (--standalone runs without the daemon)", path, min(timeout, daemonHealthTimeout))
		}
		return nil, err
	}
	a.client = client
	return a.client, nil
}

// Bounds of the CLI's talk with hvpatchd. A request may take as long as
// the daemon's own operation bound (2 minutes) plus a margin; --daemon-timeout
// changes it.
const (
	daemonDialTimeout    = 5 * time.Second
	daemonHealthTimeout  = 10 * time.Second
	defaultDaemonTimeout = 3 * time.Minute
)

func (c *daemonClient) do(ctx context.Context, method, path string, q url.Values, body, out any) error {
	u := "http://hvpatchd" + service.APIVersion + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("hvpatchd at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e service.ErrorBody
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || e.Error == "" {
			return fmt.Errorf("hvpatchd at %s: %s", c.socket, resp.Status)
		}
		return errors.New(e.Error)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("hvpatchd at %s: bad answer: %w", c.socket, err)
	}
	return nil
}

func (c *daemonClient) get(ctx context.Context, path string, q url.Values, out any) error {
	return c.do(ctx, http.MethodGet, path, q, nil, out)
}

func domainPath(name, what string) string { return "/domains/" + url.PathEscape(name) + "/" + what }

// kernelQuery answers a question about a guest kernel through the daemon
// when one serves (and the source is a domain, not a dump or a chosen
// memory backend), otherwise locally. Both return the same result type.
func kernelQuery[T any](cmd *cobra.Command, a *app, s *kernelSource, source, what string, q url.Values, local func(k *introspect.Kernel) (T, error)) (T, error) {
	var zero T
	if s.dump == "" && s.backend == "" {
		c, err := a.daemon()
		if err != nil {
			return zero, err
		}
		if c != nil {
			var v T
			return v, c.get(cmd.Context(), domainPath(source, what), q, &v)
		}
	}
	k, done, err := s.open(cmd, a, source)
	if err != nil {
		return zero, err
	}
	defer done()
	return local(k)
}

// DaemonApply sends an apply of the patch file to hvpatchd, with its
// signature (FILE.sig) when there is one. handled is false when no daemon
// serves: the caller then applies standalone. apply.go calls it first.
func (a *app) DaemonApply(ctx context.Context, domain, file string, dryRun, ripChecked bool) (res *service.PatchResult, handled bool, err error) {
	c, err := a.daemon()
	if err != nil || c == nil {
		return nil, false, err
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, true, err
	}
	req := service.ApplyRequest{Patch: string(data), File: file, DryRun: dryRun, RIPChecked: ripChecked}
	if sig, err := os.ReadFile(file + patchsign.SignatureSuffix); err == nil {
		req.Signature = string(sig)
	}
	if req.Objects, err = patchObjects(file, data); err != nil {
		return nil, true, err
	}
	var out service.PatchResult
	if err := c.do(ctx, http.MethodPost, domainPath(domain, "apply"), nil, req, &out); err != nil {
		return nil, true, err
	}
	return &out, true, nil
}

// patchObjects reads the objects the patch's replace edits link, for the
// daemon (which reads no path of a request). A patch that does not parse
// is sent as it is: the daemon's answer says why.
func patchObjects(file string, data []byte) (map[string]string, error) {
	p, err := patcher.ParsePatch(data)
	if err != nil {
		return nil, nil
	}
	p.Dir = filepath.Dir(file)
	var out map[string]string
	for _, e := range p.Edits {
		if e.Kind != patcher.KindReplace {
			continue
		}
		if _, done := out[e.Object]; done {
			continue
		}
		b, err := os.ReadFile(p.ObjectPath(&e))
		if err != nil {
			return nil, fmt.Errorf("patch file %s: object of %s: %w", file, e.String(), err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[e.Object] = base64.StdEncoding.EncodeToString(b)
	}
	return out, nil
}

// DaemonRevert is DaemonApply for a revert.
func (a *app) DaemonRevert(ctx context.Context, domain, id string) (*service.PatchResult, bool, error) {
	c, err := a.daemon()
	if err != nil || c == nil {
		return nil, false, err
	}
	var out service.PatchResult
	if err := c.do(ctx, http.MethodPost, domainPath(domain, "revert"), nil, service.RevertRequest{ID: id}, &out); err != nil {
		return nil, true, err
	}
	return &out, true, nil
}

// DaemonStatus is DaemonApply for a status.
func (a *app) DaemonStatus(ctx context.Context, domain string) (*service.Status, bool, error) {
	c, err := a.daemon()
	if err != nil || c == nil {
		return nil, false, err
	}
	var out service.Status
	if err := c.get(ctx, domainPath(domain, "status"), nil, &out); err != nil {
		return nil, true, err
	}
	return &out, true, nil
}
