package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() {
	addCommand(newApplyCmd)
	addCommand(newRevertCmd)
	addCommand(newStatusCmd)
}

// defaultStateDir holds the per-domain journals and locks.
const defaultStateDir = "/var/lib/hvpatch"

// patchFlags are shared by apply, revert and status.
type patchFlags struct {
	stateDir string
	writer   string
	cmd      *cobra.Command
}

func (f *patchFlags) add(cmd *cobra.Command) {
	def := os.Getenv("HVPATCH_STATE_DIR")
	if def == "" {
		def = defaultStateDir
	}
	f.cmd = cmd
	cmd.PreRunE = func(*cobra.Command, []string) error { return f.check() }
	cmd.Flags().StringVar(&f.stateDir, "state-dir", def, "journal and lock directory (env HVPATCH_STATE_DIR); given explicitly, the command runs standalone")
	cmd.Flags().StringVar(&f.writer, "writer", hypervisor.WriterAuto, "code writer: "+strings.Join(hypervisor.WriterNames, ", ")+" (auto: gdbstub under TCG, direct+ptrace under KVM); given explicitly, the command runs standalone")
}

// local reports whether the user asked for this process's own journal or
// writer; hvpatchd uses its configured ones, so such a command does not go
// through the daemon.
func (f *patchFlags) local() bool {
	return f.cmd.Flags().Changed("state-dir") || f.cmd.Flags().Changed("writer")
}

// check validates the flags before anything is opened or sent.
func (f *patchFlags) check() error {
	w, err := hypervisor.ParseWriter(f.writer)
	if err != nil {
		return fmt.Errorf("--writer: %w", err)
	}
	f.writer = w
	return nil
}

func (f *patchFlags) open(ctx context.Context, a *app, name string) (*patcher.Live, *patcher.Patcher, error) {
	d, err := a.Domain(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	live, err := patcher.OpenLive(ctx, d, f.writer)
	if err != nil {
		return nil, nil, err
	}
	return live, &patcher.Patcher{State: patcher.StateDir{Dir: f.stateDir}}, nil
}

// emit prints a result the same way whether it came from the daemon or
// from this process.
func emit(a *app, v interface{ WriteText(io.Writer) error }) error {
	return a.out.Emit(v, v.WriteText)
}

func newApplyCmd(a *app) *cobra.Command {
	var pf patchFlags
	var dryRun, ripChecked bool
	cmd := &cobra.Command{
		Use:   "apply DOMAIN FILE",
		Short: "Apply a patch file to a running domain's kernel",
		Long: "Plans the patch against guest memory (symbols, expected bytes, instruction boundaries),\n" +
			"then writes every edit inside one freeze of the guest and reads it back. --dry-run prints the plan only.\n" +
			"Goes through hvpatchd when it serves (the file's signature, FILE.sig, and the objects its replace edits link are sent along).",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if !pf.local() {
				if res, handled, err := a.DaemonApply(ctx, args[0], args[1], dryRun, ripChecked); handled {
					if err != nil {
						return err
					}
					return emit(a, res)
				}
			}
			p, err := patcher.LoadPatch(args[1])
			if err != nil {
				return err
			}
			live, pt, err := pf.open(ctx, a, args[0])
			if err != nil {
				return err
			}
			defer live.Close()
			out, _, err := service.Apply(ctx, pt, live, p, dryRun, ripChecked)
			if err != nil {
				return err
			}
			return emit(a, out)
		},
	}
	pf.add(cmd)
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "print the plan (addresses, bytes, disassembly) and change nothing")
	cmd.Flags().BoolVar(&ripChecked, "rip-checked", false, "allow bytes edits spanning several instructions, checked against every vCPU's RIP with the VM stopped (needs a writer that reads registers during its stop: gdbstub or direct+suspend)")
	return cmd
}

func newRevertCmd(a *app) *cobra.Command {
	var pf patchFlags
	cmd := &cobra.Command{
		Use:   "revert DOMAIN ID",
		Short: "Restore the original bytes of an applied patch",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if !pf.local() {
				if res, handled, err := a.DaemonRevert(ctx, args[0], args[1]); handled {
					if err != nil {
						return err
					}
					return emit(a, res)
				}
			}
			live, pt, err := pf.open(ctx, a, args[0])
			if err != nil {
				return err
			}
			defer live.Close()
			out, _, err := service.Revert(ctx, pt, live, args[1])
			if err != nil {
				return err
			}
			return emit(a, out)
		},
	}
	pf.add(cmd)
	return cmd
}

func newStatusCmd(a *app) *cobra.Command {
	var pf patchFlags
	cmd := &cobra.Command{
		Use:   "status DOMAIN",
		Short: "Reconcile the domain's patch journal with guest memory and show it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if !pf.local() {
				if st, handled, err := a.DaemonStatus(ctx, args[0]); handled {
					if err != nil {
						return err
					}
					return emit(a, st)
				}
			}
			live, pt, err := pf.open(ctx, a, args[0])
			if err != nil {
				return err
			}
			defer live.Close()
			st, err := pt.Reconcile(live.Domain)
			if err != nil {
				return err
			}
			return emit(a, service.StatusOf(st))
		},
	}
	pf.add(cmd)
	return cmd
}
