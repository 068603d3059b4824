package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
	dto "github.com/prometheus/client_model/go"
)

// fakeMem is guest memory of 0xab bytes; with panicky set, a read panics as
// a parser bug meeting hostile guest data would.
type fakeMem struct{ panicky bool }

func (m fakeMem) ReadPhys(gpa uint64, p []byte) error {
	if m.panicky {
		var s []byte
		_ = s[gpa] // index out of range
	}
	for i := range p {
		p[i] = 0xab
	}
	return nil
}
func (fakeMem) WritePhys(uint64, []byte) error { return hypervisor.ErrReadOnly }
func (fakeMem) Regions() []hypervisor.Region {
	return []hypervisor.Region{{GPA: 0, Size: 1 << 20, Name: "pc.ram"}}
}
func (fakeMem) Close() error { return nil }

// syncBuffer is a log sink safe for the workers' goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// isolationDaemon is a daemon without libvirt: its domains are opened by
// hook, keyed by domain name.
func isolationDaemon(t *testing.T, hook func(dom *domain, ctx context.Context, forPatch bool) error, names ...string) (*Daemon, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	cfg := &Config{StateDir: t.TempDir(), PatchDir: t.TempDir(), Writer: "auto"}
	cfg.Reconcile.Interval, cfg.Reconcile.MaxBackoff = time.Hour, 2*time.Hour
	d := &Daemon{cfg: cfg, log: slog.New(slog.NewTextHandler(logs, nil)), metrics: NewMetrics(),
		domains: map[string]*domain{}, reported: map[string]string{}, opCtx: context.Background(),
		pt: &patcher.Patcher{State: patcher.StateDir{Dir: cfg.StateDir}}, ensureHook: hook}
	for _, n := range names {
		d.domains["uuid-"+n] = newDomain(d, n, "uuid-"+n)
	}
	return d, logs
}

// TestPanicForOneGuestAPI: a panic while serving one guest's request (at
// attach, or in the handler's reading of its memory) answers that request
// with an error, marks that guest failed and is logged with its name; the
// daemon keeps answering for another guest, and for the failed one again.
func TestPanicForOneGuestAPI(t *testing.T) {
	for _, where := range []string{"attach", "handler"} {
		t.Run(where, func(t *testing.T) {
			hook := func(dom *domain, ctx context.Context, forPatch bool) error {
				if dom.Name() == "evil" && where == "attach" {
					panic("hostile BTF")
				}
				if dom.live == nil {
					dom.live = &patcher.Live{Mem: fakeMem{panicky: dom.Name() == "evil"}}
				}
				return nil
			}
			d, logs := isolationDaemon(t, hook, "evil", "good")
			srv := httptest.NewServer(d.Handler())
			defer srv.Close()
			get := func(dom string) (int, string) {
				resp, err := http.Get(srv.URL + APIVersion + "/domains/" + dom + "/mem?phys=0x10&len=4")
				if err != nil {
					t.Fatalf("GET for %s: %v (the daemon stopped serving)", dom, err)
				}
				defer resp.Body.Close()
				var b bytes.Buffer
				b.ReadFrom(resp.Body)
				return resp.StatusCode, b.String()
			}
			for round := 0; round < 3; round++ {
				code, body := get("evil")
				if code != http.StatusInternalServerError || !strings.Contains(body, "domain evil") || !strings.Contains(body, "panic") {
					t.Fatalf("round %d: evil answered %d %s; want 500 naming the domain and the panic", round, code, body)
				}
				code, body = get("good")
				var v service.Bytes
				if code != http.StatusOK || json.Unmarshal([]byte(body), &v) != nil {
					t.Fatalf("round %d: good answered %d %s after evil's panic", round, code, body)
				}
			}
			if s := d.domains["uuid-evil"].summary(); s != "failing" {
				t.Errorf("evil's summary %q, want failing", s)
			}
			if s := d.domains["uuid-good"].summary(); s != "unpatched" {
				t.Errorf("good's summary %q, want unpatched", s)
			}
			if n := counterValue(t, d.metrics, "panic"); n != 3 {
				t.Errorf("panic failures metric %v, want 3", n)
			}
			if l := logs.String(); !strings.Contains(l, "domain=evil") || !strings.Contains(l, "panic while handling a domain") || strings.Contains(l, "domain=good") {
				t.Errorf("log does not report the panic against evil alone:\n%s", l)
			}
		})
	}
}

// TestPanicForOneGuestReconcile: one domain's reconcile pass panics every
// time; its worker survives (failed, backing off), and the other domain's
// worker keeps reconciling.
func TestPanicForOneGuestReconcile(t *testing.T) {
	goodPasses := make(chan struct{}, 100)
	evilPanicked := make(chan struct{}, 100)
	hook := func(dom *domain, ctx context.Context, forPatch bool) error {
		if dom.Name() == "evil" {
			evilPanicked <- struct{}{}
			var table []int
			_ = table[len(dom.Name())] // index out of range: a runtime panic
		}
		goodPasses <- struct{}{}
		return errNotRunning{"shut off"}
	}
	d, logs := isolationDaemon(t, hook, "evil", "good")
	d.catalog = []*Declared{{File: "p.yaml", Hash: "h", Domains: []string{"*"}, Patch: &patcher.Patch{ID: "p"}}}
	d.mu.Lock()
	for _, dom := range d.domains {
		d.startWorker(dom)
	}
	d.mu.Unlock()
	defer func() {
		for _, dom := range d.domains {
			dom.stop()
		}
		d.workers.Wait()
	}()
	wait := func(c chan struct{}, what string) {
		t.Helper()
		select {
		case <-c:
		case <-time.After(time.Minute): // a safety bound only
			t.Fatalf("no %s within a minute\nlog:\n%s", what, logs.String())
		}
	}
	wait(evilPanicked, "panic of evil's pass")
	good, evil := d.domains["uuid-good"], d.domains["uuid-evil"]
	for i := 0; i < 5; i++ {
		wait(goodPasses, "pass of good")
		good.kick(true)
	}
	evil.kick(true) // a forced pass panics again; the worker is still there
	wait(evilPanicked, "second panic of evil's pass")
	good.kick(true)
	wait(goodPasses, "pass of good after evil's second panic")
	// The summaries settle once the passes in flight are done.
	for deadline := time.Now().Add(time.Minute); evil.summary() != "failing" || good.summary() != "pending"; {
		if time.Now().After(deadline) {
			t.Fatalf("summaries evil=%s good=%s; want failing and pending", evil.summary(), good.summary())
		}
		good.kick(false)
		wait(goodPasses, "pass of good")
	}
	evil.mu.Lock()
	ps := evil.patches["p.yaml"]
	evil.mu.Unlock()
	if ps == nil || ps.state != stateFailing || !strings.Contains(ps.reason, "panic") {
		t.Errorf("evil's declared patch state %+v, want failing with the panic as reason", ps)
	}
	if !strings.Contains(logs.String(), "domain=evil") {
		t.Errorf("the panic is not logged with the domain:\n%s", logs.String())
	}
}

// TestIsolateKeepsErrors: isolate passes ordinary errors through.
func TestIsolateKeepsErrors(t *testing.T) {
	want := errors.New("plain")
	if err := isolate(func() error { return want }); err != want {
		t.Fatalf("isolate changed an error: %v", err)
	}
	var gp *guestPanic
	if err := isolate(func() error { panic(42) }); !errors.As(err, &gp) || gp.value != 42 || len(gp.stack) == 0 {
		t.Fatalf("isolate of a panic: %v", err)
	}
}

func counterValue(t *testing.T, m *Metrics, reason string) float64 {
	var v dto.Metric
	if err := m.Failures.WithLabelValues(reason).Write(&v); err != nil {
		t.Fatal(err)
	}
	return v.GetCounter().GetValue()
}
