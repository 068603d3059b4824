package main

import (
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// safetyBound is how long past its own timeout the CLI may take before it
// counts as hung: generous, for a loaded host.
const safetyBound = 20 * time.Second

// A daemon socket where a process accepts connections and never answers
// (a wedged or stopped hvpatchd) does not hang the CLI.
func TestCLIHungDaemonSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hung.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	t0 := time.Now()
	_, stderr, code := runCLI(t, "--daemon-socket", path, "--daemon-timeout", "1s", "domains")
	if code == 0 || !strings.Contains(stderr, "does not answer") || !strings.Contains(stderr, "--standalone") {
		t.Errorf("hung daemon: exit %d, stderr %q; want an error saying it does not answer", code, stderr)
	}
	if took := time.Since(t0); took > time.Second+safetyBound {
		t.Errorf("the CLI took %v against a hung daemon with --daemon-timeout 1s", took)
	}
}

// A daemon that answers its health check, then never finishes a request:
// the request's bound ends it.
func TestCLIDaemonRequestTimeout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "slow.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"pid":1}`) })
	mux.HandleFunc("GET /v1/domains", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	defer srv.Close()
	defer close(release)
	t0 := time.Now()
	_, stderr, code := runCLI(t, "--daemon-socket", path, "--daemon-timeout", "1s", "domains")
	if code == 0 || !strings.Contains(stderr, "Timeout") {
		t.Errorf("request that never ends: exit %d, stderr %q; want a timeout error", code, stderr)
	}
	if took := time.Since(t0); took > time.Second+safetyBound {
		t.Errorf("the CLI took %v against a daemon that never answers a request, --daemon-timeout 1s", took)
	}
}
