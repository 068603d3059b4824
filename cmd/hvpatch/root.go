package main

import (
	"context"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/spf13/cobra"
)

// app holds the global flags and what every command needs from them.
type app struct {
	uri     string
	socket  string
	timeout time.Duration
	json    bool

	// daemonSocket is hvpatchd's API socket; commands go through the
	// daemon when it serves there, unless standalone is set.
	daemonSocket  string
	daemonTimeout time.Duration
	standalone    bool

	out    *Output
	conn   *hypervisor.Conn
	client *daemonClient
}

// commands are the subcommand constructors; each command group's file adds
// its own with addCommand in an init function, so new groups (info.go,
// ps.go, apply.go, …) need no edit here.
var commands []func(*app) *cobra.Command

func addCommand(f func(*app) *cobra.Command) { commands = append(commands, f) }

func newRootCmd() *cobra.Command {
	a := &app{}
	root := &cobra.Command{
		Use:           "hvpatch",
		Short:         "Patch the Linux kernels of running VMs from the host",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, args []string) {
			a.out = NewOutput(cmd.OutOrStdout(), a.json)
		},
		PersistentPostRun: func(cmd *cobra.Command, args []string) {
			if a.conn != nil {
				a.conn.Close()
				a.conn = nil
			}
		},
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&a.uri, "connect", "c", hypervisor.DefaultURI, "libvirt URI")
	pf.StringVar(&a.socket, "socket", hypervisor.DefaultSocket, "libvirtd unix socket")
	pf.DurationVar(&a.timeout, "timeout", hypervisor.DefaultTimeout, "bound on each libvirt call")
	pf.BoolVar(&a.json, "json", false, "print JSON instead of text")
	pf.StringVar(&a.daemonSocket, "daemon-socket", daemonSocketDefault(), "hvpatchd's API socket (env HVPATCH_DAEMON_SOCKET); used when a daemon serves there")
	pf.DurationVar(&a.daemonTimeout, "daemon-timeout", defaultDaemonTimeout, "bound on each request to hvpatchd (a daemon that does not answer its health check within 10 s is an error at once)")
	pf.BoolVar(&a.standalone, "standalone", false, "do not use hvpatchd even when it runs: reach libvirt and guest memory directly")
	for _, f := range commands {
		root.AddCommand(f(a))
	}
	return root
}

// Connect opens (once) the libvirt connection the global flags describe.
func (a *app) Connect(ctx context.Context) (*hypervisor.Conn, error) {
	if a.conn != nil {
		return a.conn, nil
	}
	c, err := hypervisor.Connect(ctx, hypervisor.Config{URI: a.uri, Socket: a.socket, Timeout: a.timeout})
	if err != nil {
		return nil, err
	}
	a.conn = c
	return c, nil
}

// Domain looks up a domain by name or UUID.
func (a *app) Domain(ctx context.Context, nameOrUUID string) (*hypervisor.Domain, error) {
	c, err := a.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return c.LookupDomain(ctx, nameOrUUID)
}
