package daemon

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are hvpatchd's Prometheus metrics, in a registry of their own so
// tests and embedders do not collide with the global one.
type Metrics struct {
	Registry     *prometheus.Registry
	Applies      *prometheus.CounterVec // by result: applied, already_applied, refused, failed
	Reverts      *prometheus.CounterVec // by result
	Failures     *prometheus.CounterVec // by reason
	FreezeWindow *prometheus.HistogramVec
	Domains      *prometheus.GaugeVec // by state: patched, waiting, pending, failing, unpatched
	Passes       prometheus.Counter   // reconcile passes over all domains
	// ModuleEvents counts patched modules seen unloaded ("gone") and
	// waited-for modules seen loaded ("appeared", the patch applied).
	ModuleEvents *prometheus.CounterVec
	// LateApply is how long after the module poll saw the module list
	// change a waiting patch was applied.
	LateApply prometheus.Histogram
}

// NewMetrics registers every metric.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Applies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hvpatch_applies_total", Help: "Patch applications by result.",
		}, []string{"result"}),
		Reverts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hvpatch_reverts_total", Help: "Patch reverts by result.",
		}, []string{"result"}),
		Failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hvpatch_failures_total", Help: "Failed or refused operations by reason.",
		}, []string{"reason"}),
		// Buckets from 10 µs (ptrace freezes) to 1 s (suspend/resume on a
		// loaded host).
		FreezeWindow: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hvpatch_freeze_window_seconds",
			Help:    "How long vCPUs were stopped per patch operation, by method.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2.5, 14),
		}, []string{"method"}),
		Domains: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hvpatch_domains", Help: "Domains by patch state.",
		}, []string{"state"}),
		Passes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hvpatch_reconcile_passes_total", Help: "Reconcile passes over all domains (finished or failed).",
		}),
		ModuleEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hvpatch_module_events_total", Help: "Modules of declared patches seen unloaded (gone) or loaded (appeared, patch applied).",
		}, []string{"event"}),
		LateApply: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "hvpatch_late_apply_seconds",
			Help:    "From the module poll seeing the module list change to a waiting patch applied.",
			Buckets: prometheus.ExponentialBuckets(1e-3, 2.5, 12),
		}),
	}
	m.Registry.MustRegister(m.Applies, m.Reverts, m.Failures, m.FreezeWindow, m.Domains, m.Passes, m.ModuleEvents, m.LateApply,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveFreeze records one freeze window.
func (m *Metrics) ObserveFreeze(method string, d time.Duration) {
	m.FreezeWindow.WithLabelValues(method).Observe(d.Seconds())
}
