package service

import (
	"context"
	"fmt"
	"io"
	"math"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
	"github.com/hvpatch/hvpatch/patcher"
)

// The patch results below have the JSON form of cmd/hvpatch's apply,
// revert and status commands, so a daemon's answer decodes into them.

// Plan is the machine-readable form of a patcher.Plan.
type Plan struct {
	Patch   string `json:"patch"`
	Release string `json:"release"`
	BuildID string `json:"build_id,omitempty"`
	Edits   []Edit `json:"edits"`
	// Replacements are the code-area side of replace edits: where the new
	// code goes and how it was linked.
	Replacements []Replacement `json:"replacements,omitempty"`
}

// Replacement is the new code of one replace edit.
type Replacement struct {
	Edit     int    `json:"edit"` // 1-based, as in Edits
	Function string `json:"function"`
	Object   string `json:"object"`
	With     string `json:"with"`
	// WithAddr is where the jump leads (With in the linked object).
	WithAddr string `json:"with_addr,omitempty"`
	// AreaEntry is the code-area entry holding the object, shared by the
	// patch's replace edits of the same object; ObjectSHA256 the hash of
	// the bytes linked.
	AreaEntry    string `json:"area_entry,omitempty"`
	ObjectSHA256 string `json:"object_sha256,omitempty"`
	// SharesWith, when not 0, is the earlier edit (1-based) whose entry
	// this edit shares: the link map and writes are shown there once.
	SharesWith int             `json:"shares_with,omitempty"`
	LinkMap    *linker.LinkMap `json:"link_map,omitempty"`
	// Writes lists what installing it writes into the code area.
	Writes []string `json:"writes,omitempty"`
}

// Edit is one planned edit.
type Edit struct {
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

// Freeze is how long the guest was stopped.
type Freeze struct {
	WindowUS float64 `json:"window_us"`
	Method   string  `json:"method"`
	VCPUs    int     `json:"vcpus"`
}

// Window is the freeze window as a duration.
func (f Freeze) Window() time.Duration { return time.Duration(math.Round(f.WindowUS * 1e3)) }

// PatchResult reports an apply or a revert.
type PatchResult struct {
	Domain     string   `json:"domain"`
	Patch      string   `json:"patch"`
	DryRun     bool     `json:"dry_run,omitempty"`
	NoOp       bool     `json:"no_op,omitempty"`
	Message    string   `json:"message,omitempty"`
	Freeze     *Freeze  `json:"freeze,omitempty"`
	Plan       *Plan    `json:"plan,omitempty"`
	Reconciled []string `json:"reconciled,omitempty"`
	// AlreadyApplied is set on a dry run whose plan finds the patch in
	// memory already.
	AlreadyApplied bool `json:"already_applied,omitempty"`
}

func (r PatchResult) WriteText(w io.Writer) error {
	if r.DryRun && r.Plan != nil {
		writePlan(w, r.Plan)
		if r.AlreadyApplied {
			fmt.Fprintf(w, "patch %s is already applied: apply would do nothing\n", r.Patch)
		}
		return nil
	}
	for _, s := range r.Reconciled {
		fmt.Fprintln(w, "journal reconciled: "+s)
	}
	fmt.Fprintln(w, r.Message)
	if r.Freeze != nil {
		_, err := fmt.Fprintf(w, "freeze window: %v (%s, %d vCPUs)\n", r.Freeze.Window(), r.Freeze.Method, r.Freeze.VCPUs)
		return err
	}
	return nil
}

// FreezeOf converts a freeze report; nil when nothing was frozen.
func FreezeOf(fr patcher.FreezeReport) *Freeze {
	if fr.Method == "" {
		return nil
	}
	return &Freeze{WindowUS: float64(fr.Window.Nanoseconds()) / 1e3, Method: fr.Method, VCPUs: fr.VCPUs}
}

// Reconciled lists journal entries that did not match guest memory.
func Reconciled(ps []patcher.PatchStatus) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Entry.ID+": "+p.Difference)
	}
	return out
}

// PlanOf converts a plan.
func PlanOf(pl *patcher.Plan) *Plan {
	out := &Plan{Patch: pl.Patch.ID, Release: pl.Release, BuildID: pl.BuildID}
	linked := map[any]int{} // link map (or entry) -> the edit showing it
	for _, e := range pl.Edits {
		gpa := ""
		if len(e.Chunks) > 0 {
			gpa = fmt.Sprintf("%#x", e.Chunks[0].GPA)
		}
		out.Edits = append(out.Edits, Edit{
			Kind: e.Kind, Symbol: e.Symbol, Offset: e.Offset, VA: fmt.Sprintf("%#x", e.VA), GPA: gpa,
			Old: patcher.FormatHex(e.Old), New: patcher.FormatHex(e.New), Applied: e.Applied, RIPCheck: e.RIPCheck,
			Before: instLines(e.Before), After: instLines(e.After),
		})
		if r := e.Replace; r != nil {
			rep := Replacement{Edit: len(out.Edits), Function: e.Symbol, Object: r.Object, With: r.With,
				AreaEntry: r.AreaEntryName(), ObjectSHA256: r.SHA256}
			if r.WithAddr != 0 {
				rep.WithAddr = fmt.Sprintf("%#x", r.WithAddr)
			}
			var key any = r.LinkMap // one link map per placement
			if r.LinkMap == nil && rep.AreaEntry != "" {
				key = "entry " + rep.AreaEntry // already placed
			}
			if first, shared := linked[key]; shared && key != any((*linker.LinkMap)(nil)) {
				rep.SharesWith = first
			} else {
				linked[key] = rep.Edit
				rep.LinkMap = r.LinkMap
				for _, w := range r.Writes {
					rep.Writes = append(rep.Writes, fmt.Sprintf("%s: guest-physical %#x, %d bytes", w.What, w.GPA, len(w.New)))
				}
			}
			out.Replacements = append(out.Replacements, rep)
		}
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

func writePlan(w io.Writer, p *Plan) {
	fmt.Fprintf(w, "plan for patch %s on kernel %s", p.Patch, Escape(p.Release))
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
	for _, r := range p.Replacements {
		fmt.Fprintf(w, "edit %d replaces %s with %s from %s", r.Edit, r.Function, r.With, r.Object)
		if r.WithAddr != "" {
			fmt.Fprintf(w, " (jump to %s)", r.WithAddr)
		}
		fmt.Fprintln(w)
		if r.AreaEntry != "" {
			fmt.Fprintf(w, "  code-area entry %s", r.AreaEntry)
			if r.ObjectSHA256 != "" {
				fmt.Fprintf(w, ", object sha256 %s", r.ObjectSHA256)
			}
			fmt.Fprintln(w)
		}
		if r.SharesWith != 0 {
			fmt.Fprintf(w, "  shares the entry of edit %d: linked and placed once\n", r.SharesWith)
			continue
		}
		if r.LinkMap == nil {
			fmt.Fprintln(w, "  already in the code area")
			continue
		}
		fmt.Fprintln(w, "  link map:")
		var b strings.Builder
		r.LinkMap.Format(&b)
		for _, l := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
			fmt.Fprintln(w, "    "+l)
		}
		fmt.Fprintln(w, "  code area writes (in order, inside the freeze, before the jump):")
		for _, l := range r.Writes {
			fmt.Fprintln(w, "    "+l)
		}
	}
}

// Apply applies p to the live domain (or plans it, dryRun).
func Apply(ctx context.Context, pt *patcher.Patcher, live *patcher.Live, p *patcher.Patch, dryRun, ripChecked bool) (PatchResult, *patcher.Result, error) {
	opt := patcher.ApplyOptions{PlanOptions: patcher.PlanOptions{RIPChecked: ripChecked}}
	out := PatchResult{Domain: live.Name, Patch: p.ID, DryRun: dryRun}
	if dryRun {
		pl, err := patcher.MakePlan(live.Target, p, opt.PlanOptions)
		if err != nil {
			return out, nil, fmt.Errorf("domain %s: %w", live.Name, err)
		}
		out.Plan, out.AlreadyApplied = PlanOf(pl), pl.AlreadyApplied()
		return out, nil, nil
	}
	res, err := pt.Apply(ctx, live.Domain, p, opt)
	if err != nil {
		return out, res, err
	}
	out.NoOp, out.Message, out.Freeze, out.Plan = res.NoOp, res.Message, FreezeOf(res.Freeze), PlanOf(res.Plan)
	out.Reconciled = Reconciled(res.Reconciled)
	return out, res, nil
}

// Revert reverts patch id on the live domain.
func Revert(ctx context.Context, pt *patcher.Patcher, live *patcher.Live, id string) (PatchResult, *patcher.Result, error) {
	res, err := pt.Revert(ctx, live.Domain, id)
	if err != nil {
		return PatchResult{Domain: live.Name, Patch: id}, res, err
	}
	return PatchResult{Domain: live.Name, Patch: id, NoOp: res.NoOp, Message: res.Message, Freeze: FreezeOf(res.Freeze),
		Reconciled: Reconciled(res.Reconciled)}, res, nil
}

// Status is a domain's journal reconciled with its memory.
type Status struct {
	Domain  string        `json:"domain"`
	UUID    string        `json:"uuid"`
	Release string        `json:"release"`
	BootID  string        `json:"boot_id"`
	Patches []PatchStatus `json:"patches"`
	Changed bool          `json:"journal_changed"`
	// Declared is the daemon's view of the patches declared for this
	// domain in its patch directory (absent when run standalone).
	Declared []Declared `json:"declared,omitempty"`
}

// PatchStatus is one journaled patch.
type PatchStatus struct {
	ID         string      `json:"id"`
	Journal    string      `json:"journal_state"`
	Memory     string      `json:"memory"`
	Time       time.Time   `json:"time,omitzero"` // absent when the journal has no time
	FreezeUS   float64     `json:"freeze_window_us,omitempty"`
	Edits      int         `json:"edits"`
	Difference string      `json:"difference,omitempty"`
	Changes    []EditBytes `json:"changes,omitempty"`
}

// EditBytes is where one edit lives and what it wrote, so a status can be
// checked against guest memory read independently.
type EditBytes struct {
	Symbol string `json:"symbol"`
	VA     string `json:"va"`
	GPA    string `json:"gpa,omitempty"`
	Old    string `json:"old"`
	New    string `json:"new"`
	// AreaEntry is the code-area entry a replace edit's jump leads into.
	AreaEntry string `json:"area_entry,omitempty"`
}

// Declared is one patch file the daemon keeps applied on a domain.
type Declared struct {
	File    string    `json:"file"`
	ID      string    `json:"id"`
	State   string    `json:"state"` // applied, pending, waiting (for a module: Reason names it), refused, failing
	Reason  string    `json:"reason,omitempty"`
	KeyID   string    `json:"key_id,omitempty"`
	Since   time.Time `json:"since,omitzero"`
	NextTry time.Time `json:"next_try,omitzero"`
}

// formatTime is an RFC 3339 time, or "-" for none (never 0001-01-01).
func formatTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.RFC3339)
}

// StatusOf converts a reconciled status.
func StatusOf(st *patcher.Status) Status {
	out := Status{Domain: st.Domain, UUID: st.UUID, Release: st.Release, BootID: st.BootID, Changed: st.Changed, Patches: []PatchStatus{}}
	for _, ps := range st.Patches {
		p := PatchStatus{
			ID: ps.Entry.ID, Journal: ps.Entry.State, Memory: ps.Memory, Time: ps.Entry.Time,
			FreezeUS: float64(ps.Entry.Freeze.Nanoseconds()) / 1e3, Edits: len(ps.Entry.Edits), Difference: ps.Difference,
		}
		for _, e := range ps.Entry.Edits {
			eb := EditBytes{Symbol: e.Symbol, VA: HexAddr(e.VA), Old: patcher.FormatHex(e.Old), New: patcher.FormatHex(e.New), AreaEntry: e.AreaEntry}
			if len(e.Chunks) == 1 {
				eb.GPA = HexAddr(e.Chunks[0].GPA)
			}
			p.Changes = append(p.Changes, eb)
		}
		out.Patches = append(out.Patches, p)
	}
	return out
}

func (s Status) WriteText(w io.Writer) error {
	fmt.Fprintf(w, "domain %s, kernel %s\n", Escape(s.Domain), Escape(s.Release))
	if len(s.Patches) == 0 {
		fmt.Fprintln(w, "no patches applied")
	} else {
		var rows [][]string
		for _, p := range s.Patches {
			win := "-"
			if p.FreezeUS > 0 {
				win = fmt.Sprintf("%.0fµs", p.FreezeUS)
			}
			rows = append(rows, []string{p.ID, p.Journal, p.Memory, formatTime(p.Time), win, fmt.Sprint(p.Edits)})
		}
		if err := Table(w, []string{"id", "journal", "memory", "applied at", "freeze window", "edits"}, rows); err != nil {
			return err
		}
		for _, p := range s.Patches {
			if p.Difference != "" {
				fmt.Fprintf(w, "%s: %s\n", p.ID, strings.TrimSpace(p.Difference))
			}
		}
		for _, p := range s.Patches {
			var order []string
			users := map[string][]string{}
			for _, c := range p.Changes {
				if c.AreaEntry == "" {
					continue
				}
				if users[c.AreaEntry] == nil {
					order = append(order, c.AreaEntry)
				}
				users[c.AreaEntry] = append(users[c.AreaEntry], c.Symbol)
			}
			for _, name := range order {
				fmt.Fprintf(w, "%s: code-area entry %s, entered from %s\n", p.ID, Escape(name), Escape(strings.Join(users[name], ", ")))
			}
		}
	}
	if len(s.Declared) > 0 {
		fmt.Fprintln(w, "declared patches (hvpatchd):")
		for _, d := range s.Declared {
			line := fmt.Sprintf("  %s (%s): %s", d.ID, d.File, d.State)
			if d.Reason != "" {
				line += ": " + d.Reason
			}
			fmt.Fprintln(w, line)
		}
	}
	return nil
}
