package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/buildinfo"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// app holds the global flags and what every command needs from them.
type app struct {
	uri     string
	socket  string
	timeout time.Duration
	json    bool

	// domain is the DOMAIN the command is about, for --json errors.
	domain string

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
	root, _ := newRoot()
	return root
}

// newRoot is the command tree and the app its flags fill in.
func newRoot() (*cobra.Command, *app) {
	a := &app{}
	root := &cobra.Command{
		Use:   "hvpatch",
		Short: "Patch the Linux kernels of running VMs from the host",
		Long: "hvpatch reads and patches the kernels of running libvirt/QEMU guests from the host:\n" +
			"introspection (info, sym, syms, read, ps, lsmod, btf, mem read) and live patches (apply,\n" +
			"revert, status, build). It goes through hvpatchd when one serves, otherwise it reaches\n" +
			"libvirt and guest memory itself. The connection follows virsh: -c URI, else\n" +
			"$LIBVIRT_DEFAULT_URI, else qemu:///system.",
		Version:       buildinfo.Read().String(),
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, args []string) {
			a.out = NewOutput(cmd.OutOrStdout(), a.json)
			a.domain = domainArg(cmd, args)
		},
		PersistentPostRun: func(cmd *cobra.Command, args []string) {
			if a.conn != nil {
				a.conn.Close()
				a.conn = nil
			}
		},
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&a.uri, "connect", "c", "", "libvirt URI, as virsh -c takes it (default $LIBVIRT_DEFAULT_URI, else "+hypervisor.DefaultURI+"); qemu+unix:///system?socket=PATH names the socket")
	pf.StringVar(&a.socket, "socket", "", "libvirtd unix socket (default: the URI's, "+hypervisor.DefaultSocket+" for qemu:///system)")
	pf.DurationVar(&a.timeout, "timeout", hypervisor.DefaultTimeout, "bound on each libvirt call")
	pf.BoolVar(&a.json, "json", false, "print JSON instead of text")
	pf.StringVar(&a.daemonSocket, "daemon-socket", daemonSocketDefault(), "hvpatchd's API socket (env HVPATCH_DAEMON_SOCKET); used when a daemon serves there")
	pf.DurationVar(&a.daemonTimeout, "daemon-timeout", defaultDaemonTimeout, "bound on each request to hvpatchd (a daemon that does not answer its health check within 10 s is an error at once)")
	pf.BoolVar(&a.standalone, "standalone", false, "do not use hvpatchd even when it runs: reach libvirt and guest memory directly")
	for _, f := range commands {
		root.AddCommand(f(a))
	}
	root.SetVersionTemplate("{{.Name}} {{.Version}}\n")
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return &usageError{cmd: cmd, err: err} })
	forEachCommand(root, func(c *cobra.Command) {
		if c.Example == "" {
			c.Example = examples[c.CommandPath()]
		}
		if c.Args != nil {
			check := c.Args
			c.Args = func(cmd *cobra.Command, args []string) error {
				if err := check(cmd, args); err != nil {
					return &usageError{cmd: cmd, err: fmt.Errorf("%s: %w", cmd.CommandPath(), err)}
				}
				return nil
			}
		}
	})
	return root, a
}

func forEachCommand(c *cobra.Command, f func(*cobra.Command)) {
	f(c)
	for _, sub := range c.Commands() {
		forEachCommand(sub, f)
	}
}

// usageError is a wrong argument or flag: main prints the command's usage
// after it and exits 2.
type usageError struct {
	cmd *cobra.Command
	err error
}

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

// usageErr is a usage error of cmd with a message.
func usageErr(cmd *cobra.Command, format string, args ...any) error {
	return &usageError{cmd: cmd, err: fmt.Errorf(format, args...)}
}

// usageText is what follows a usage error: the usage line, the examples,
// and where the flags are listed.
func (e *usageError) usageText() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage:\n  %s\n", e.cmd.UseLine())
	if e.cmd.HasAvailableSubCommands() {
		fmt.Fprintf(&b, "  %s [command]\n", e.cmd.CommandPath())
	}
	if e.cmd.Example != "" {
		fmt.Fprintf(&b, "\nExamples:\n%s\n", e.cmd.Example)
	}
	fmt.Fprintf(&b, "\nRun '%s --help' for the flags.\n", e.cmd.CommandPath())
	return b.String()
}

// domainArg is the DOMAIN argument of a command whose usage starts with it
// (not with --dump, which replaces it), or "".
func domainArg(cmd *cobra.Command, args []string) string {
	use := strings.Fields(cmd.Use)
	if len(use) < 2 || use[1] != "DOMAIN" || len(args) == 0 {
		return ""
	}
	if f := cmd.Flags().Lookup("dump"); f != nil && f.Changed {
		return ""
	}
	return args[0]
}

// libvirtConfig is the libvirt connection the global flags and the
// environment describe, the way virsh picks it: -c URI, else
// $VIRSH_DEFAULT_CONNECT_URI or $LIBVIRT_DEFAULT_URI, else qemu:///system;
// the socket from the URI unless --socket names one.
func (a *app) libvirtConfig() (hypervisor.Config, error) {
	uri := a.uri
	if uri == "" {
		uri = hypervisor.URIFromEnv()
	}
	driver, socket, err := hypervisor.ParseURI(uri)
	if err != nil {
		return hypervisor.Config{}, err
	}
	if a.socket != "" {
		socket = a.socket
	}
	return hypervisor.Config{URI: driver, Socket: socket, Timeout: a.timeout}, nil
}

// jsonRequested reports whether --json is among args (for errors that stop
// the command before its flags are parsed).
func jsonRequested(args []string) bool {
	fs := pflag.NewFlagSet("", pflag.ContinueOnError)
	fs.ParseErrorsAllowlist.UnknownFlags = true
	fs.Usage = func() {}
	v := fs.Bool("json", false, "")
	fs.SetOutput(discard{})
	fs.Parse(args)
	return *v
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// Connect opens (once) the libvirt connection the global flags describe.
func (a *app) Connect(ctx context.Context) (*hypervisor.Conn, error) {
	if a.conn != nil {
		return a.conn, nil
	}
	cfg, err := a.libvirtConfig()
	if err != nil {
		return nil, err
	}
	c, err := hypervisor.Connect(ctx, cfg)
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
