package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"

	"github.com/hvpatch/hvpatch/docs"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// APIVersion prefixes every API path.
const APIVersion = service.APIVersion

// The request and error bodies live in service, which the CLI shares.
type (
	ApplyRequest  = service.ApplyRequest
	RevertRequest = service.RevertRequest
	ErrorBody     = service.ErrorBody
)

// Health is the answer to GET /v1/health.
type Health struct {
	PID           int    `json:"pid"`
	RequireSigned bool   `json:"require_signed"`
	PatchDir      string `json:"patch_dir"`
}

// PatchFile is one file of the patch directory (GET /v1/patches).
type PatchFile struct {
	File    string   `json:"file"`
	ID      string   `json:"id,omitempty"`
	Domains []string `json:"domains,omitempty"`
	KeyID   string   `json:"key_id,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// Handler is the API: the same on the unix socket and the TLS listener.
//
//	GET  /v1/health
//	GET  /v1/domains
//	GET  /v1/patches
//	GET  /v1/domains/{domain}/info
//	GET  /v1/domains/{domain}/sym?q=NAME|0xADDR
//	GET  /v1/domains/{domain}/syms?grep=RE
//	GET  /v1/domains/{domain}/read?target=SYM[+OFF]|0xADDR&len=N[&disasm=1]
//	GET  /v1/domains/{domain}/mem?phys=0xADDR&len=N
//	GET  /v1/domains/{domain}/ps
//	GET  /v1/domains/{domain}/lsmod
//	GET  /v1/domains/{domain}/btf?type=NAME...  (a C header of the guest's BTF)
//	GET  /v1/domains/{domain}/status
//	POST /v1/domains/{domain}/apply   (ApplyRequest: patch file, signature, objects)
//	POST /v1/domains/{domain}/revert  (RevertRequest)
//	GET  /metrics
//	GET  /openapi.json  (docs/openapi.json: this API in OpenAPI 3)
func (d *Daemon) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /openapi.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(docs.OpenAPI)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET "+APIVersion+"/health", func(w http.ResponseWriter, r *http.Request) {
		reply(w, Health{PID: os.Getpid(), RequireSigned: d.cfg.Signing.RequireSigned, PatchDir: d.cfg.PatchDir}, nil)
	})
	mux.HandleFunc("GET "+APIVersion+"/domains", func(w http.ResponseWriter, r *http.Request) {
		ds, err := d.conn.Domains(r.Context())
		reply(w, service.Domains(ds), err)
	})
	mux.HandleFunc("GET "+APIVersion+"/patches", func(w http.ResponseWriter, r *http.Request) {
		d.mu.Lock()
		out := []PatchFile{}
		for _, c := range d.catalog {
			pf := PatchFile{File: c.File, Domains: c.Domains, KeyID: c.KeyID}
			if c.Patch != nil {
				pf.ID = c.Patch.ID
			}
			if c.Err != nil {
				pf.Error = c.Err.Error()
			}
			out = append(out, pf)
		}
		d.mu.Unlock()
		reply(w, out, nil)
	})
	kernel := func(pattern string, f func(r *http.Request, source string, k *introspect.Kernel) (any, error)) {
		mux.HandleFunc("GET "+APIVersion+"/domains/{domain}/"+pattern, func(w http.ResponseWriter, r *http.Request) {
			source := r.PathValue("domain")
			dom, err := d.lookup(r.Context(), source)
			if err != nil {
				reply(w, nil, err)
				return
			}
			var v any
			err = dom.withLive(false, func(ctx context.Context, live *patcher.Live) error {
				var err error
				v, err = f(r, source, live.Kernel)
				return err
			})
			reply(w, v, err)
		})
	}
	kernel("info", func(r *http.Request, src string, k *introspect.Kernel) (any, error) {
		return service.KernelInfo(src, k), nil
	})
	kernel("sym", func(r *http.Request, src string, k *introspect.Kernel) (any, error) {
		return service.Sym(src, k, r.URL.Query().Get("q"))
	})
	kernel("syms", func(r *http.Request, src string, k *introspect.Kernel) (any, error) {
		return service.Syms(k, r.URL.Query().Get("grep"))
	})
	kernel("read", func(r *http.Request, src string, k *introspect.Kernel) (any, error) {
		q := r.URL.Query()
		n, err := strconv.ParseUint(q.Get("len"), 0, 64)
		if err != nil {
			return nil, badRequest(fmt.Errorf("len %q: %w", q.Get("len"), err))
		}
		return service.Read(src, k, q.Get("target"), n, q.Get("disasm") == "1")
	})
	kernel("ps", func(r *http.Request, src string, k *introspect.Kernel) (any, error) { return service.Ps(src, k) })
	kernel("lsmod", func(r *http.Request, src string, k *introspect.Kernel) (any, error) { return service.Lsmod(src, k) })
	kernel("btf", func(r *http.Request, src string, k *introspect.Kernel) (any, error) {
		return service.BTFC(src, k, r.URL.Query()["type"])
	})
	mux.HandleFunc("GET "+APIVersion+"/domains/{domain}/mem", func(w http.ResponseWriter, r *http.Request) {
		source := r.PathValue("domain")
		q := r.URL.Query()
		gpa, err1 := strconv.ParseUint(q.Get("phys"), 0, 64)
		n, err2 := strconv.ParseUint(q.Get("len"), 0, 64)
		if err := errors.Join(err1, err2); err != nil {
			reply(w, nil, badRequest(err))
			return
		}
		dom, err := d.lookup(r.Context(), source)
		if err != nil {
			reply(w, nil, err)
			return
		}
		var v service.Bytes
		err = dom.withLive(false, func(ctx context.Context, live *patcher.Live) error {
			var err error
			v, err = service.MemRead(source, live.Mem, gpa, n)
			return err
		})
		reply(w, v, err)
	})
	mux.HandleFunc("GET "+APIVersion+"/domains/{domain}/status", func(w http.ResponseWriter, r *http.Request) {
		dom, err := d.lookup(r.Context(), r.PathValue("domain"))
		if err != nil {
			reply(w, nil, err)
			return
		}
		var v service.Status
		err = dom.withLive(false, func(ctx context.Context, live *patcher.Live) error {
			st, err := d.pt.Reconcile(live.Domain)
			if err != nil {
				return err
			}
			v = service.StatusOf(st)
			v.Declared = dom.declared()
			sort.Slice(v.Declared, func(i, j int) bool { return v.Declared[i].File < v.Declared[j].File })
			return nil
		})
		reply(w, v, err)
	})
	mux.HandleFunc("POST "+APIVersion+"/domains/{domain}/apply", func(w http.ResponseWriter, r *http.Request) {
		var req ApplyRequest
		if err := decodeBodyMax(w, r, &req, maxApplyBody); err != nil {
			reply(w, nil, err)
			return
		}
		v, err := d.apiApply(r.Context(), r.PathValue("domain"), req)
		reply(w, v, err)
	})
	mux.HandleFunc("POST "+APIVersion+"/domains/{domain}/revert", func(w http.ResponseWriter, r *http.Request) {
		var req RevertRequest
		if err := decodeBody(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		dom, err := d.lookup(r.Context(), r.PathValue("domain"))
		if err != nil {
			reply(w, nil, err)
			return
		}
		var v service.PatchResult
		err = dom.withLive(true, func(ctx context.Context, live *patcher.Live) error {
			var res *patcher.Result
			var err error
			v, res, err = service.Revert(ctx, d.pt, live, req.ID)
			d.count(d.metrics.Reverts, "reverted", res, err)
			if err == nil {
				d.log.Info("patch reverted (API)", "domain", live.Name, "patch", req.ID, "message", v.Message)
			}
			return err
		})
		reply(w, v, err)
	})
	return d.recoverHTTP(mux)
}

// apiApply verifies, parses and applies a patch sent to the API.
func (d *Daemon) apiApply(ctx context.Context, domain string, req ApplyRequest) (service.PatchResult, error) {
	data := []byte(req.Patch)
	name := req.File
	if name == "" {
		name = "patch"
	}
	keyID := ""
	if d.cfg.Signing.RequireSigned || req.Signature != "" {
		if req.Signature == "" {
			d.metrics.Failures.WithLabelValues("signature").Inc()
			return service.PatchResult{}, forbidden(fmt.Errorf("%s: refused: patch is not signed, and hvpatchd requires signed patches (hvpatch sign)", name))
		}
		id, err := d.keyring.Verify(data, []byte(req.Signature))
		if err != nil {
			d.metrics.Failures.WithLabelValues("signature").Inc()
			return service.PatchResult{}, forbidden(fmt.Errorf("%s: refused: %w", name, err))
		}
		keyID = id
	}
	p, sel, err := ParseForAPI(data)
	if err != nil {
		return service.PatchResult{}, badRequest(fmt.Errorf("patch file %s: %w", name, err))
	}
	// The objects come with the request, checked against the pins of the
	// (verified) patch file; nothing resolves against this process's
	// working directory.
	if d.cfg.Signing.RequireSigned {
		if err := requirePinned(p); err != nil {
			d.metrics.Failures.WithLabelValues("signature").Inc()
			return service.PatchResult{}, forbidden(fmt.Errorf("%s: %w", name, err))
		}
	}
	objs, err := checkObjects(p, req.Objects)
	if err != nil {
		var oe *objectError
		if errors.As(err, &oe) && oe.mismatch && keyID != "" {
			d.metrics.Failures.WithLabelValues("signature").Inc()
			return service.PatchResult{}, forbidden(fmt.Errorf("%s: %w", name, err))
		}
		return service.PatchResult{}, badRequest(fmt.Errorf("%s: %w", name, err))
	}
	if len(objs) > 0 {
		dir, err := stageObjects(d.cfg.StateDir, p, objs)
		if err != nil {
			return service.PatchResult{}, fmt.Errorf("%s: keeping the objects for the apply: %w", name, err)
		}
		defer os.RemoveAll(dir)
	}
	dom, err := d.lookup(ctx, domain)
	if err != nil {
		return service.PatchResult{}, err
	}
	if len(sel) > 0 {
		probe := &Declared{Domains: sel}
		if !probe.Selects(dom.Name(), dom.uuid) {
			return service.PatchResult{}, badRequest(fmt.Errorf("patch %s selects domains %v, not %s", p.ID, sel, dom.Name()))
		}
	}
	var v service.PatchResult
	err = dom.withLive(!req.DryRun, func(ctx context.Context, live *patcher.Live) error {
		var res *patcher.Result
		var err error
		v, res, err = service.Apply(ctx, d.pt, live, p, req.DryRun, req.RIPChecked)
		if req.DryRun {
			return err
		}
		d.count(d.metrics.Applies, "applied", res, err)
		if err == nil && !v.NoOp {
			d.log.Info("patch applied (API)", "domain", live.Name, "patch", p.ID, "key_id", keyID, "message", v.Message)
		}
		return err
	})
	return v, err
}

// count records an apply or revert in the metrics.
func (d *Daemon) count(c *prometheus.CounterVec, done string, res *patcher.Result, err error) {
	if res != nil && res.Freeze.Method != "" {
		d.metrics.ObserveFreeze(res.Freeze.Method, res.Freeze.Window)
	}
	switch {
	case errors.Is(err, patcher.ErrBusy):
		c.WithLabelValues("busy").Inc()
	case err != nil:
		c.WithLabelValues("failed").Inc()
		d.metrics.Failures.WithLabelValues("api").Inc()
	case res.NoOp:
		c.WithLabelValues("no_op").Inc()
	default:
		c.WithLabelValues(done).Inc()
	}
}

func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 4<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return badRequest(fmt.Errorf("request body: %w", err))
	}
	return nil
}

// decodeBodyMax is decodeBody for a body of at most limit bytes; a larger
// one is refused as such (413), not as malformed JSON.
func decodeBodyMax(w http.ResponseWriter, r *http.Request, v any, limit int64) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return &statusError{http.StatusRequestEntityTooLarge, fmt.Errorf("request body: more than %d MiB (an object may be %d MiB, all objects %d MiB)", limit>>20, MaxObjectBytes>>20, MaxObjectsBytes>>20)}
		}
		return badRequest(fmt.Errorf("request body: %w", err))
	}
	return nil
}

type statusError struct {
	code int
	error
}

func (e *statusError) Unwrap() error { return e.error }

func badRequest(err error) error { return &statusError{http.StatusBadRequest, err} }
func forbidden(err error) error  { return &statusError{http.StatusForbidden, err} }

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		var se *statusError
		var nf *notFoundError
		switch {
		case errors.As(err, &se):
			code = se.code
		case errors.As(err, &nf):
			code = http.StatusNotFound
		case errors.Is(err, patcher.ErrBusy):
			code = http.StatusConflict
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(ErrorBody{Error: err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}
