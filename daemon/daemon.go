package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/patchsign"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Daemon keeps the declared patches applied and serves the API.
type Daemon struct {
	cfg     *Config
	log     *slog.Logger
	metrics *Metrics
	conn    *hypervisor.Conn
	pt      *patcher.Patcher
	keyring patchsign.Keyring
	// kernels shares symbol tables and BTF between guests of one kernel
	// build.
	kernels *introspect.BuildCache

	// opCtx is never cancelled by shutdown: an operation that started
	// finishes (a freeze is short), only new ones are not started.
	opCtx context.Context

	mu       sync.Mutex
	domains  map[string]*domain // by UUID
	catalog  []*Declared
	reported map[string]string // file -> last error reported, so it is logged once
	workers  sync.WaitGroup    // domain workers and forget calls; Run waits for them
	stopping bool

	// ensureHook, when set (tests), replaces opening a domain's kernel.
	ensureHook func(dom *domain, ctx context.Context, forPatch bool) error
}

// New prepares a daemon: keys, libvirt connection, state directory.
func New(ctx context.Context, cfg *Config, log *slog.Logger) (*Daemon, error) {
	d := &Daemon{cfg: cfg, log: log, metrics: NewMetrics(), domains: map[string]*domain{}, reported: map[string]string{}, kernels: &introspect.BuildCache{},
		pt: &patcher.Patcher{State: patcher.StateDir{Dir: cfg.StateDir}}, opCtx: context.WithoutCancel(ctx)}
	if os.Getenv("HVPATCHD_SHARE_KERNELS") == "0" {
		d.kernels = nil // every guest decodes its own kernel: the benchmark's baseline
	}
	var keys []string
	for _, k := range cfg.Signing.TrustedKeys {
		if _, err := os.Stat(k); err == nil {
			keys = append(keys, k)
		} else if cfg.Signing.RequireSigned {
			return nil, fmt.Errorf("signing.trusted_keys: %w", err)
		}
	}
	kr, err := patchsign.LoadKeyring(keys...)
	if err != nil {
		return nil, fmt.Errorf("signing.trusted_keys: %w", err)
	}
	if cfg.Signing.RequireSigned && len(kr) == 0 {
		return nil, fmt.Errorf("signing.require_signed is set but signing.trusted_keys %v holds no public key", cfg.Signing.TrustedKeys)
	}
	d.keyring = kr
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	d.conn, err = hypervisor.Connect(ctx, hypervisor.Config{URI: cfg.Libvirt.URI, Socket: cfg.Libvirt.Socket, Timeout: cfg.Libvirt.Timeout})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// Metrics returns the daemon's metrics.
func (d *Daemon) Metrics() *Metrics { return d.metrics }

// Run serves until ctx is cancelled, then shuts down gracefully: listeners
// close first, requests and domain operations in progress finish, then Run
// returns.
func (d *Daemon) Run(ctx context.Context) error {
	mode, err := d.cfg.SocketMode()
	if err != nil {
		return err
	}
	d.recoverStops(ctx)
	l, err := ListenUnix(d.cfg.API.Socket, mode, d.cfg.API.Owner, d.cfg.API.Group)
	if err != nil {
		return err
	}
	api := d.Handler()
	servers := []*http.Server{{Handler: api, ReadHeaderTimeout: 10 * time.Second}}
	listeners := []net.Listener{l}
	if a := d.cfg.API.TCP; a.Addr != "" {
		tc, err := TLSConfig(a.CertFile, a.KeyFile, a.ClientCAFile)
		if err != nil {
			l.Close()
			return err
		}
		tl, err := net.Listen("tcp", a.Addr)
		if err != nil {
			l.Close()
			return fmt.Errorf("api.tcp.addr: %w", err)
		}
		servers = append(servers, &http.Server{Handler: api, TLSConfig: tc, ReadHeaderTimeout: 10 * time.Second})
		listeners = append(listeners, tl)
	}
	if d.cfg.Metrics.Addr != "" {
		ml, err := net.Listen("tcp", d.cfg.Metrics.Addr)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			return fmt.Errorf("metrics.addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(d.metrics.Registry, promhttp.HandlerOpts{}))
		servers = append(servers, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second})
		listeners = append(listeners, ml)
	}
	errc := make(chan error, len(servers))
	for i, s := range servers {
		s, l := s, listeners[i]
		go func() {
			var err error
			if s.TLSConfig != nil {
				err = s.ServeTLS(l, "", "")
			} else {
				err = s.Serve(l)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	d.log.Info("hvpatchd serving", "socket", d.cfg.API.Socket, "tcp", d.cfg.API.TCP.Addr, "metrics", d.cfg.Metrics.Addr,
		"patch_dir", d.cfg.PatchDir, "state_dir", d.cfg.StateDir, "require_signed", d.cfg.Signing.RequireSigned, "pid", os.Getpid())

	loopCtx, stopLoops := context.WithCancel(ctx)
	var loops sync.WaitGroup
	loops.Add(1)
	go func() { defer loops.Done(); d.watch(loopCtx) }()

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	d.log.Info("hvpatchd shutting down: finishing operations in progress")
	stopLoops()
	shutCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
	defer cancel()
	for _, s := range servers {
		s.Shutdown(shutCtx)
	}
	loops.Wait()
	d.mu.Lock()
	d.stopping = true
	doms := make([]*domain, 0, len(d.domains))
	for _, dom := range d.domains {
		dom.stop()
		doms = append(doms, dom)
	}
	d.mu.Unlock()
	d.workers.Wait()
	for _, dom := range doms { // without d.mu: see the lock order on domain
		dom.close()
	}
	d.conn.Close()
	d.log.Info("hvpatchd stopped")
	return runErr
}

// watch follows libvirt events and, every reconcile interval, the domain
// list and the patch directory.
func (d *Daemon) watch(ctx context.Context) {
	events := d.conn.Events(ctx)
	d.safeRefresh(ctx)
	tick := time.NewTicker(d.cfg.Reconcile.Interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			d.recoverStops(ctx)
			d.safeRefresh(ctx)
		case ev, ok := <-events:
			if !ok {
				return
			}
			d.log.Debug("libvirt event", "domain", ev.Name, "event", ev.Kind, "detail", ev.Detail)
			switch ev.Kind {
			case "resync", "defined", "undefined", "stopped", "started":
				d.safeRefresh(ctx)
			}
			switch ev.Kind {
			case "reboot", "started", "resumed", "crashed", "stopped", "shutdown":
				if dom := d.domainByUUID(ev.UUID); dom != nil {
					dom.kick(ev.Kind == "reboot" || ev.Kind == "started")
				}
			}
		}
	}
}

// safeRefresh is refresh under isolate: a panic is logged, the loop goes on.
func (d *Daemon) safeRefresh(ctx context.Context) {
	if gp, ok := isolate(func() error { d.refresh(ctx); return nil }).(*guestPanic); ok {
		d.log.Error("panic while refreshing the domain list and patch directory", "panic", fmt.Sprint(gp.value), "stack", string(gp.stack))
		d.metrics.Failures.WithLabelValues("panic").Inc()
	}
}

// refresh reloads the patch directory and the domain list, starting a
// worker for each new domain and forgetting domains that are gone.
func (d *Daemon) refresh(ctx context.Context) {
	cat, err := loadCatalog(d.cfg.PatchDir, d.keyring, d.cfg.Signing.RequireSigned)
	if err != nil {
		d.log.Error("reading the patch directory", "dir", d.cfg.PatchDir, "err", err)
	}
	infos, lerr := d.conn.Domains(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopping {
		return
	}
	if err == nil {
		d.catalog = cat
		seen := map[string]bool{}
		for _, c := range cat {
			seen[c.File] = true
			msg := ""
			if c.Err != nil {
				msg = c.Err.Error()
			}
			if d.reported[c.File] != msg && msg != "" {
				d.log.Warn("patch file not usable", "file", c.File, "err", msg)
				reason := "invalid"
				if c.Unsigned {
					reason = "signature"
				}
				d.metrics.Failures.WithLabelValues(reason).Inc()
			}
			d.reported[c.File] = msg
		}
		for f := range d.reported {
			if !seen[f] {
				delete(d.reported, f)
			}
		}
	}
	if lerr != nil {
		d.log.Warn("listing domains", "err", lerr)
		return
	}
	present := map[string]bool{}
	for _, info := range infos {
		present[info.UUID] = true
		if dom, ok := d.domains[info.UUID]; ok {
			dom.setName(info.Name)
			dom.kick(false)
			continue
		}
		dom := newDomain(d, info.Name, info.UUID)
		d.domains[info.UUID] = dom
		d.startWorker(dom)
		d.log.Debug("domain found", "domain", info.Name, "uuid", info.UUID, "state", info.State)
	}
	for uuid, dom := range d.domains {
		if !present[uuid] {
			d.log.Info("domain gone: forgetting it", "domain", dom.Name(), "uuid", uuid)
			dom.stop()
			delete(d.domains, uuid)
			d.workers.Add(1) // Run waits for it like for a worker
			go func() {
				defer d.workers.Done()
				if gp, ok := isolate(func() error { dom.forget(); return nil }).(*guestPanic); ok {
					d.log.Error("panic while forgetting a domain", "domain", dom.Name(), "uuid", uuid, "panic", fmt.Sprint(gp.value))
				}
			}()
		}
	}
	d.updateGaugeLocked()
}

// startWorker runs dom's reconcile loop; d.mu is held and d is not stopping.
func (d *Daemon) startWorker(dom *domain) {
	d.workers.Add(1)
	go func() { defer d.workers.Done(); dom.run() }()
}

func (d *Daemon) domainByUUID(uuid string) *domain {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.domains[uuid]
}

// declaredFor lists the usable and unusable patch files selecting a domain.
func (d *Daemon) declaredFor(name, uuid string) []*Declared {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*Declared
	for _, c := range d.catalog {
		if c.Err == nil && c.Selects(name, uuid) {
			out = append(out, c)
		}
	}
	return out
}

// updateGauge recounts domains by state; d.mu is not held.
func (d *Daemon) updateGauge() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.updateGaugeLocked()
}

// updateGaugeLocked is updateGauge with d.mu held.
func (d *Daemon) updateGaugeLocked() {
	counts := map[string]float64{"patched": 0, "pending": 0, "failing": 0, "unpatched": 0}
	for _, dom := range d.domains {
		counts[dom.summary()]++
	}
	for s, n := range counts {
		d.metrics.Domains.WithLabelValues(s).Set(n)
	}
}

// lookup finds the worker of a domain named by name or UUID, asking
// libvirt for domains the daemon has not seen yet.
func (d *Daemon) lookup(ctx context.Context, nameOrUUID string) (*domain, error) {
	d.mu.Lock()
	for _, dom := range d.domains {
		if dom.uuid == nameOrUUID || dom.Name() == nameOrUUID {
			d.mu.Unlock()
			return dom, nil
		}
	}
	d.mu.Unlock()
	hv, err := d.conn.LookupDomain(ctx, nameOrUUID)
	if err != nil {
		return nil, &notFoundError{err}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if dom, ok := d.domains[hv.UUID()]; ok {
		return dom, nil
	}
	if d.stopping {
		return nil, errors.New("hvpatchd is shutting down")
	}
	dom := newDomain(d, hv.Name(), hv.UUID())
	d.domains[hv.UUID()] = dom
	d.startWorker(dom)
	return dom, nil
}

type notFoundError struct{ error }

func (e *notFoundError) Unwrap() error { return e.error }
