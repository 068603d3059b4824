// Command hvpatchd keeps declared kernel patches applied to the libvirt
// guests of this host and serves hvpatch's API on a unix socket.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/hvpatch/hvpatch/daemon"
	"github.com/hvpatch/hvpatch/internal/buildinfo"
	"github.com/spf13/pflag"
)

func main() {
	cfg, code := parseArgs(os.Args[1:], os.Stderr)
	if cfg == nil {
		os.Exit(code)
	}
	log := newLogger(cfg)
	// SIGTERM/SIGINT cancel ctx: Run stops accepting and returns once the
	// operation in progress (never half a freeze) is done.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := daemon.New(ctx, cfg, log)
	if err != nil {
		log.Error("starting", "err", err)
		os.Exit(1)
	}
	if cfg.Kubernetes.Enabled {
		agent, err := daemon.NewKubeAgent(d, log)
		if err != nil {
			log.Error("starting the kubernetes node agent", "err", err)
			os.Exit(1)
		}
		go agent.Run(ctx)
	}
	if err := d.Run(ctx); err != nil {
		log.Error("serving", "err", err)
		os.Exit(1)
	}
}

// stdout is where --version prints (a variable for tests).
var stdout io.Writer = os.Stdout

// parseArgs reads the flags and the configuration. It returns nil and the
// exit status when hvpatchd must not start (--help: 0; a bad flag, argument
// or setting: 2, after saying why on stderr).
func parseArgs(args []string, stderr io.Writer) (*daemon.Config, int) {
	fs := pflag.NewFlagSet("hvpatchd", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	daemon.Flags(fs)
	version := fs.Bool("version", false, "print the version (module version and VCS revision) and exit")
	manDir := fs.String("gen-man", "", "write the man page hvpatchd.8 into this directory and exit (make install)")
	fs.MarkHidden("gen-man")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: hvpatchd [flags]\n\n%s\n\n%s", description, fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, 0
		}
		fmt.Fprintf(stderr, "hvpatchd: %v (hvpatchd --help lists the flags)\n", err)
		return nil, 2
	}
	if *version {
		fmt.Fprintln(stdout, "hvpatchd", buildinfo.Read().String())
		return nil, 0
	}
	if *manDir != "" {
		if err := writeMan(fs, *manDir); err != nil {
			fmt.Fprintln(stderr, "hvpatchd:", err)
			return nil, 1
		}
		return nil, 0
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "hvpatchd: unexpected argument %q: hvpatchd takes only flags (hvpatchd --help lists them)\n", fs.Arg(0))
		return nil, 2
	}
	cfg, err := daemon.LoadConfig(fs)
	if err != nil {
		fmt.Fprintln(stderr, "hvpatchd:", err)
		return nil, 2
	}
	return cfg, 0
}

func newLogger(cfg *daemon.Config) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(cfg.Log.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Log.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
