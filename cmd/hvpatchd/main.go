// Command hvpatchd keeps declared kernel patches applied to the libvirt
// guests of this host and serves hvpatch's API on a unix socket.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/hvpatch/hvpatch/daemon"
	"github.com/spf13/pflag"
)

func main() {
	fs := pflag.NewFlagSet("hvpatchd", pflag.ContinueOnError)
	daemon.Flags(fs)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "Usage: hvpatchd [flags]\n\nKeeps the patches of the patch directory applied to the guests they select,\nand serves hvpatch's API. Flags override HVPATCHD_* environment variables,\nwhich override the configuration file.\n\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			os.Exit(0)
		}
		os.Exit(2)
	}
	cfg, err := daemon.LoadConfig(fs)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hvpatchd:", err)
		os.Exit(2)
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
	if err := d.Run(ctx); err != nil {
		log.Error("serving", "err", err)
		os.Exit(1)
	}
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
