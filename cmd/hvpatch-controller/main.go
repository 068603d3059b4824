// Command hvpatch-controller runs the fleet rollout controller: it advances
// HotPatch objects canary -> waves -> all, halts on failed gates, pauses,
// resumes and rolls back (fleet/controller, docs/fleet.md).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/hvpatch/hvpatch/fleet/controller"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

func main() {
	fs := flag.NewFlagSet("hvpatch-controller", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (empty: in-cluster)")
	metrics := fs.String("metrics-addr", "0", `Prometheus metrics address ("0": off)`)
	probes := fs.String("health-addr", "", "health and readiness probe address (empty: off)")
	leader := fs.Bool("leader-elect", false, "elect one active controller among replicas (a Lease in --leader-namespace)")
	leaderNS := fs.String("leader-namespace", "hvpatch-system", "namespace of the leader election Lease")
	resync := fs.Duration("resync", 30*time.Second, "look at every HotPatch at least this often")
	minStatus := fs.Duration("min-status-interval", 2*time.Second, "coalesce count-only status writes of a HotPatch to at most one per interval")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	log.SetLogger(logr.FromSlogHandler(logger.Handler()))
	if err := run(*kubeconfig, *metrics, *probes, *leader, *leaderNS, *resync, *minStatus, logger); err != nil {
		fmt.Fprintln(os.Stderr, "hvpatch-controller:", err)
		os.Exit(1)
	}
}

func run(kubeconfig, metrics, probes string, leader bool, leaderNS string, resync, minStatus time.Duration, logger *slog.Logger) error {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	rc.UserAgent = "hvpatch-controller"
	mgr, err := ctrl.NewManager(rc, ctrl.Options{
		Scheme:                  controller.Scheme(),
		Metrics:                 metricsserver.Options{BindAddress: metrics},
		HealthProbeBindAddress:  probes,
		LeaderElection:          leader,
		LeaderElectionID:        "hvpatch-controller",
		LeaderElectionNamespace: leaderNS,
	})
	if err != nil {
		return err
	}
	r := &controller.Reconciler{Client: mgr.GetClient(), Resync: resync, MinStatusInterval: minStatus}
	if err := r.SetupWithManager(mgr); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logger.Info("hvpatch-controller starting", "pid", os.Getpid())
	return mgr.Start(ctx)
}
