package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/patcher"
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
}

func (f *patchFlags) add(cmd *cobra.Command) {
	def := os.Getenv("HVPATCH_STATE_DIR")
	if def == "" {
		def = defaultStateDir
	}
	cmd.Flags().StringVar(&f.stateDir, "state-dir", def, "journal and lock directory (env HVPATCH_STATE_DIR)")
	cmd.Flags().StringVar(&f.writer, "writer", "", "code writer: gdbstub, direct+ptrace, direct+suspend, or empty to choose from the accelerator")
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

// planJSON is the machine-readable form of a plan.
type planJSON struct {
	Patch   string     `json:"patch"`
	Release string     `json:"release"`
	BuildID string     `json:"build_id,omitempty"`
	Edits   []editJSON `json:"edits"`
}

type editJSON struct {
	Kind     string   `json:"kind"`
	Symbol   string   `json:"symbol"`
	Offset   uint64   `json:"offset"`
	VA       string   `json:"va"`
	GPA      string   `json:"gpa"`
	Old      string   `json:"old"`
	New      string   `json:"new"`
	Applied  bool     `json:"already_applied"`
	RIPCheck bool     `json:"rip_checked"`
	Before   []string `json:"before,omitempty"`
	After    []string `json:"after,omitempty"`
}

type resultJSON struct {
	Domain  string    `json:"domain"`
	Patch   string    `json:"patch"`
	DryRun  bool      `json:"dry_run,omitempty"`
	NoOp    bool      `json:"no_op,omitempty"`
	Message string    `json:"message,omitempty"`
	Freeze  *freezeJS `json:"freeze,omitempty"`
	Plan    *planJSON `json:"plan,omitempty"`
	// Reconciled: journal entries that did not match guest memory when the
	// command started.
	Reconciled []string `json:"reconciled,omitempty"`
}

func reconciled(ps []patcher.PatchStatus) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Entry.ID+": "+p.Difference)
	}
	return out
}

// writeResult prints an apply or revert in text form.
func writeResult(w io.Writer, out resultJSON, fr patcher.FreezeReport) {
	for _, r := range out.Reconciled {
		fmt.Fprintln(w, "journal reconciled: "+r)
	}
	fmt.Fprintln(w, out.Message)
	if out.Freeze != nil {
		fmt.Fprintf(w, "freeze window: %v (%s, %d vCPUs)\n", fr.Window, fr.Method, fr.VCPUs)
	}
}

type freezeJS struct {
	WindowUS float64 `json:"window_us"`
	Method   string  `json:"method"`
	VCPUs    int     `json:"vcpus"`
}

func freezeOf(fr patcher.FreezeReport) *freezeJS {
	if fr.Method == "" {
		return nil
	}
	return &freezeJS{WindowUS: float64(fr.Window.Nanoseconds()) / 1e3, Method: fr.Method, VCPUs: fr.VCPUs}
}

func toPlanJSON(pl *patcher.Plan) *planJSON {
	out := &planJSON{Patch: pl.Patch.ID, Release: pl.Release, BuildID: pl.BuildID}
	for _, e := range pl.Edits {
		gpa := ""
		if len(e.Chunks) > 0 {
			gpa = fmt.Sprintf("%#x", e.Chunks[0].GPA)
		}
		out.Edits = append(out.Edits, editJSON{
			Kind: e.Kind, Symbol: e.Symbol, Offset: e.Offset, VA: fmt.Sprintf("%#x", e.VA), GPA: gpa,
			Old: patcher.FormatHex(e.Old), New: patcher.FormatHex(e.New), Applied: e.Applied, RIPCheck: e.RIPCheck,
			Before: instLines(e.Before), After: instLines(e.After),
		})
	}
	return out
}

func instLines(insts []introspect.Inst) []string {
	var out []string
	for _, in := range insts {
		out = append(out, fmt.Sprintf("%#x: %-20s %s", in.Addr, patcher.FormatHex(in.Bytes), in.Text))
	}
	return out
}

func writePlan(w io.Writer, p *planJSON) {
	fmt.Fprintf(w, "plan for patch %s on kernel %s", p.Patch, p.Release)
	if p.BuildID != "" {
		fmt.Fprintf(w, " (build id %s)", p.BuildID)
	}
	fmt.Fprintln(w)
	for i, e := range p.Edits {
		fmt.Fprintf(w, "edit %d: %s %s+%#x at %s (guest-physical %s)\n", i+1, e.Kind, e.Symbol, e.Offset, e.VA, e.GPA)
		fmt.Fprintf(w, "  old: %s\n  new: %s\n", e.Old, e.New)
		if e.Applied {
			fmt.Fprintln(w, "  memory already holds the new bytes")
		}
		if e.RIPCheck {
			fmt.Fprintln(w, "  spans several instructions: applied only while no vCPU executes inside them")
		}
		fmt.Fprintln(w, "  before:")
		for _, l := range e.Before {
			fmt.Fprintln(w, "    "+l)
		}
		fmt.Fprintln(w, "  after:")
		for _, l := range e.After {
			fmt.Fprintln(w, "    "+l)
		}
	}
}

func newApplyCmd(a *app) *cobra.Command {
	var pf patchFlags
	var dryRun, ripChecked bool
	cmd := &cobra.Command{
		Use:   "apply DOMAIN FILE",
		Short: "Apply a patch file to a running domain's kernel",
		Long: "Plans the patch against guest memory (symbols, expected bytes, instruction boundaries),\n" +
			"then writes every edit inside one freeze of the guest and reads it back. --dry-run prints the plan only.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			p, err := patcher.LoadPatch(args[1])
			if err != nil {
				return err
			}
			live, pt, err := pf.open(ctx, a, args[0])
			if err != nil {
				return err
			}
			defer live.Close()
			opt := patcher.ApplyOptions{PlanOptions: patcher.PlanOptions{RIPChecked: ripChecked}}
			out := resultJSON{Domain: live.Name, Patch: p.ID, DryRun: dryRun}
			if dryRun {
				pl, err := patcher.MakePlan(live.Target, p, opt.PlanOptions)
				if err != nil {
					return fmt.Errorf("domain %s: %w", live.Name, err)
				}
				out.Plan = toPlanJSON(pl)
				return a.out.Emit(out, func(w io.Writer) error {
					writePlan(w, out.Plan)
					if pl.AlreadyApplied() {
						fmt.Fprintf(w, "patch %s is already applied: apply would do nothing\n", p.ID)
					}
					return nil
				})
			}
			res, err := pt.Apply(ctx, live.Domain, p, opt)
			if err != nil {
				return err
			}
			out.NoOp, out.Message, out.Freeze, out.Plan = res.NoOp, res.Message, freezeOf(res.Freeze), toPlanJSON(res.Plan)
			out.Reconciled = reconciled(res.Reconciled)
			return a.out.Emit(out, func(w io.Writer) error {
				writeResult(w, out, res.Freeze)
				return nil
			})
		},
	}
	pf.add(cmd)
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "print the plan (addresses, bytes, disassembly) and change nothing")
	cmd.Flags().BoolVar(&ripChecked, "rip-checked", false, "allow bytes edits spanning several instructions, checked against every vCPU's RIP with the VM stopped (needs --writer direct+suspend or gdbstub)")
	return cmd
}

func newRevertCmd(a *app) *cobra.Command {
	var pf patchFlags
	cmd := &cobra.Command{
		Use:   "revert DOMAIN ID",
		Short: "Restore the original bytes of an applied patch",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			live, pt, err := pf.open(cmd.Context(), a, args[0])
			if err != nil {
				return err
			}
			defer live.Close()
			res, err := pt.Revert(cmd.Context(), live.Domain, args[1])
			if err != nil {
				return err
			}
			out := resultJSON{Domain: live.Name, Patch: args[1], NoOp: res.NoOp, Message: res.Message, Freeze: freezeOf(res.Freeze),
				Reconciled: reconciled(res.Reconciled)}
			return a.out.Emit(out, func(w io.Writer) error {
				writeResult(w, out, res.Freeze)
				return nil
			})
		},
	}
	pf.add(cmd)
	return cmd
}

type statusJSON struct {
	Domain  string            `json:"domain"`
	UUID    string            `json:"uuid"`
	Release string            `json:"release"`
	BootID  string            `json:"boot_id"`
	Patches []patchStatusJSON `json:"patches"`
	Changed bool              `json:"journal_changed"`
}

type patchStatusJSON struct {
	ID         string    `json:"id"`
	Journal    string    `json:"journal_state"`
	Memory     string    `json:"memory"`
	Time       time.Time `json:"time"`
	FreezeUS   float64   `json:"freeze_window_us,omitempty"`
	Edits      int       `json:"edits"`
	Difference string    `json:"difference,omitempty"`
}

func newStatusCmd(a *app) *cobra.Command {
	var pf patchFlags
	cmd := &cobra.Command{
		Use:   "status DOMAIN",
		Short: "Reconcile the domain's patch journal with guest memory and show it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			live, pt, err := pf.open(cmd.Context(), a, args[0])
			if err != nil {
				return err
			}
			defer live.Close()
			st, err := pt.Reconcile(live.Domain)
			if err != nil {
				return err
			}
			out := statusJSON{Domain: st.Domain, UUID: st.UUID, Release: st.Release, BootID: st.BootID, Changed: st.Changed, Patches: []patchStatusJSON{}}
			for _, ps := range st.Patches {
				out.Patches = append(out.Patches, patchStatusJSON{
					ID: ps.Entry.ID, Journal: ps.Entry.State, Memory: ps.Memory, Time: ps.Entry.Time,
					FreezeUS: float64(ps.Entry.Freeze.Nanoseconds()) / 1e3, Edits: len(ps.Entry.Edits), Difference: ps.Difference,
				})
			}
			return a.out.Emit(out, func(w io.Writer) error {
				fmt.Fprintf(w, "domain %s, kernel %s\n", st.Domain, st.Release)
				if len(out.Patches) == 0 {
					fmt.Fprintln(w, "no patches applied")
					return nil
				}
				var rows [][]string
				for _, p := range out.Patches {
					win := "-"
					if p.FreezeUS > 0 {
						win = fmt.Sprintf("%.0fµs", p.FreezeUS)
					}
					rows = append(rows, []string{p.ID, p.Journal, p.Memory, p.Time.Format(time.RFC3339), win, fmt.Sprint(p.Edits)})
				}
				if err := Table(w, []string{"id", "journal", "memory", "applied at", "freeze window", "edits"}, rows); err != nil {
					return err
				}
				for _, p := range out.Patches {
					if p.Difference != "" {
						fmt.Fprintf(w, "%s: %s\n", p.ID, strings.TrimSpace(p.Difference))
					}
				}
				return nil
			})
		},
	}
	pf.add(cmd)
	return cmd
}
