package daemon

import (
	"fmt"
	"net/http"
	"runtime/debug"
	"time"
)

// A guest controls all of its memory, so every parse of it may meet input
// nobody planned for. The parsers return errors, but a bug that panics while
// handling one guest must cost that guest only: the reconcile pass of one
// domain and every API request that touches one domain run under isolate,
// and a panic there is logged with the domain, counted, and marks the
// domain failed (its cached kernel is dropped, the next pass backs off);
// hvpatchd keeps serving the other guests.

// guestPanic is a panic caught while handling one guest.
type guestPanic struct {
	value any
	stack []byte
}

func (p *guestPanic) Error() string {
	return fmt.Sprintf("internal error (hvpatchd recovered from a panic; see its log): %v", p.value)
}

// isolate runs f and turns a panic in it into a *guestPanic error.
func isolate(f func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				panic(v) // net/http's own signal to abort a response
			}
			err = &guestPanic{value: v, stack: debug.Stack()}
		}
	}()
	return f()
}

// safePass is pass under isolate: a panic marks the domain failed and the
// next pass comes after a backoff.
func (dom *domain) safePass(force bool) time.Duration {
	defer dom.d.metrics.Passes.Inc()
	var next time.Duration
	err := isolate(func() error { next = dom.pass(force); return nil })
	if gp, ok := err.(*guestPanic); ok {
		return dom.failed("reconcile", gp)
	}
	return next
}

// failed records a panic caught while handling dom (dom.mu is not held):
// it is logged with the domain, counted, the cached kernel and libvirt
// handle are dropped (their state is unknown), every declared patch is
// reported failing, and the returned backoff doubles with each consecutive
// panic up to reconcile.max_backoff.
func (dom *domain) failed(where string, gp *guestPanic) time.Duration {
	cfg := dom.d.cfg.Reconcile
	dom.d.log.Error("panic while handling a domain: domain marked failed, other domains unaffected",
		"domain", dom.Name(), "uuid", dom.uuid, "during", where, "panic", fmt.Sprint(gp.value), "stack", string(gp.stack))
	dom.d.metrics.Failures.WithLabelValues("panic").Inc()
	var backoff time.Duration
	func() {
		dom.mu.Lock()
		defer dom.mu.Unlock()
		defer func() { recover() }() // closing a half-built mapping must not panic out again
		dom.panics++
		backoff = min(cfg.Interval<<min(dom.panics-1, 20), cfg.MaxBackoff)
		reason := gp.Error()
		for _, ps := range dom.patches {
			ps.state, ps.reason, ps.nextTry, ps.since = stateFailing, reason, time.Now().Add(backoff), time.Now()
		}
		dom.sum.Store("failing")
		dom.hv = nil
		dom.dropLive()
	}()
	dom.d.updateGauge()
	return backoff
}

// recoverHTTP answers 500 for a panic in a handler instead of letting
// net/http drop the connection (a per-guest handler has isolate already;
// this covers the rest).
func (d *Daemon) recoverHTTP(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := isolate(func() error { h.ServeHTTP(w, r); return nil })
		if gp, ok := err.(*guestPanic); ok {
			d.log.Error("panic in an API handler", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(gp.value), "stack", string(gp.stack))
			d.metrics.Failures.WithLabelValues("panic").Inc()
			reply(w, nil, gp)
		}
	})
}
