package patcher

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
)

// The patcher writes through the one code-writer abstraction of the
// hypervisor package: Stop freezes the guest so it can be read and written
// safely, and what a stop allows (reading vCPU registers) is a method of
// the stopped guest, not a name to compare. The hypervisor package provides
// the real writers (gdbstub, direct+ptrace, direct+suspend); tests and
// hvpatchd wrap them by embedding.
type (
	CodeWriter   = hypervisor.CodeWriter
	StoppedGuest = hypervisor.StoppedGuest
	FreezeReport = hypervisor.FreezeReport
)

// Domain is one guest as the patcher sees it.
type Domain struct {
	Name, UUID string
	Target     Target
	Writer     CodeWriter
}

// Patcher applies and reverts patches, keeping journals in State.
type Patcher struct {
	State StateDir
	Now   func() time.Time // for tests; time.Now when nil
}

// Result reports one apply or revert.
type Result struct {
	PatchID string
	Plan    *Plan
	// NoOp is set when nothing had to be written (Message says why).
	NoOp    bool
	Message string
	Freeze  FreezeReport
	// ReleaseTime and ReleaseWaits report a revert's release of
	// replacement code (its stops come after the one removing the jumps).
	ReleaseTime  time.Duration
	ReleaseWaits int
	// Reconciled lists journal entries found not to match guest memory
	// when the operation started (and corrected in the journal).
	Reconciled []PatchStatus
}

// ApplyOptions change Apply.
type ApplyOptions struct {
	PlanOptions
}

func (pt *Patcher) now() time.Time {
	if pt.Now != nil {
		return pt.Now()
	}
	return time.Now()
}

// begin starts an operation on d: it takes the domain's lock, loads the
// journal and reconciles it with guest memory. The caller unlocks.
func (pt *Patcher) begin(d Domain) (*DomainLock, *Journal, *Status, error) {
	lock, err := pt.State.Lock(d.Name, d.UUID)
	if err != nil {
		return nil, nil, nil, err
	}
	j, err := pt.State.Load(d.Name, d.UUID)
	if err == nil {
		var st *Status
		if st, err = pt.reconcile(d, j); err == nil {
			return lock, j, st, nil
		}
	}
	lock.Unlock()
	return nil, nil, nil, err
}

// Apply plans the patch, then writes all its edits inside one freeze.
// Nothing is written if planning fails; on any failure inside the freeze,
// what was written is restored before the guest runs again.
func (pt *Patcher) Apply(ctx context.Context, d Domain, p *Patch, opt ApplyOptions) (*Result, error) {
	lock, j, st, err := pt.begin(d)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	pl, err := MakePlan(d.Target, p, opt.PlanOptions)
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	res := &Result{PatchID: p.ID, Plan: pl, Reconciled: st.Differences()}
	if old := j.Find(p.ID); old != nil && old.BootID == pl.BootID && old.State == StateApplied {
		if pl.AlreadyApplied() {
			res.NoOp, res.Message = true, fmt.Sprintf("patch %s is already applied on domain %s (since %s)", p.ID, d.Name, old.Time.Format(time.RFC3339))
			return res, nil
		}
	}
	// Before trusting bytes already in place: they may be another patch's.
	if err := checkOtherPatches(j, pl); err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	if pl.AlreadyApplied() {
		// Memory holds the patch but the journal does not (say it) for this
		// boot: record it so that it can be reverted.
		j.put(pt.entry(pl, StateApplied, "", 0))
		if err := pt.State.Save(j); err != nil {
			return nil, err
		}
		res.NoOp, res.Message = true, fmt.Sprintf("patch %s is already applied on domain %s (found in guest memory; journal updated)", p.ID, d.Name)
		return res, nil
	}
	for _, e := range pl.Edits {
		if e.Applied {
			return nil, fmt.Errorf("domain %s: patch %s is partly applied (%s+%#x already holds the new bytes); revert or reconcile first", d.Name, p.ID, e.Symbol, e.Offset)
		}
	}
	// Journal first: a crash between here and the next save leaves a
	// pending entry that reconcile resolves by reading the guest.
	j.put(pt.entry(pl, StatePending, d.Writer.Name(), 0))
	if err := pt.State.Save(j); err != nil {
		return nil, err
	}
	fr, err := writeUnderFreeze(ctx, d, pl, false)
	res.Freeze = fr
	if err != nil {
		j.remove(p.ID)
		if serr := pt.State.Save(j); serr != nil {
			err = fmt.Errorf("%w (and the journal could not be updated: %v)", err, serr)
		}
		return res, fmt.Errorf("domain %s: applying %s: %w", d.Name, p.ID, err)
	}
	j.put(pt.entry(pl, StateApplied, d.Writer.Name(), fr.Window))
	if err := pt.State.Save(j); err != nil {
		return res, fmt.Errorf("domain %s: patch %s is applied but the journal could not be saved: %w", d.Name, p.ID, err)
	}
	res.Message = fmt.Sprintf("patch %s applied on domain %s: %d edit(s), guest frozen %v (%s)", p.ID, d.Name, len(pl.Edits), fr.Window, fr.Method)
	return res, nil
}

// checkOtherPatches refuses edits overlapping those of another applied patch.
func checkOtherPatches(j *Journal, pl *Plan) error {
	for _, jp := range j.Patches {
		if jp.ID == pl.Patch.ID || jp.BootID != pl.BootID {
			continue
		}
		for _, je := range jp.Edits {
			for _, e := range pl.Edits {
				if e.VA < je.VA+uint64(len(je.New)) && je.VA < e.VA+uint64(len(e.New)) {
					return fmt.Errorf("patch %s edits %s+%#x, which patch %s (%s) already changed", pl.Patch.ID, e.Symbol, e.Offset, jp.ID, jp.State)
				}
			}
		}
	}
	return nil
}

func (pt *Patcher) entry(pl *Plan, state, writer string, window time.Duration) JournalPatch {
	return JournalPatch{
		ID: pl.Patch.ID, Description: pl.Patch.Description, State: state,
		Release: pl.Release, BuildID: pl.BuildID, BootID: pl.BootID,
		Time: pt.now().UTC(), Writer: writer, Freeze: window, Edits: journalEdits(pl),
	}
}

// Revert restores the original bytes of an applied patch, after checking
// that the patched bytes are still there.
func (pt *Patcher) Revert(ctx context.Context, d Domain, id string) (*Result, error) {
	lock, j, st, err := pt.begin(d)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	jp := j.Find(id)
	if jp == nil {
		for _, ps := range st.Differences() {
			if ps.Entry.ID == id {
				return nil, fmt.Errorf("domain %s: patch %s is not applied: %s", d.Name, id, ps.Difference)
			}
		}
		return nil, fmt.Errorf("domain %s: patch %s is not applied (not in the journal)", d.Name, id)
	}
	if jp.State != StateApplied && jp.State != StateReleasing {
		return nil, fmt.Errorf("domain %s: patch %s is in state %s with memory holding %s; it needs attention before a revert", d.Name, id, jp.State, memState(st, id))
	}
	pl := &Plan{Patch: &Patch{ID: jp.ID, Description: jp.Description}, Release: jp.Release, BuildID: jp.BuildID, BootID: jp.BootID}
	allOld := true
	for i, je := range jp.Edits {
		cur := make([]byte, len(je.New))
		if err := d.Target.ReadVirt(je.VA, cur); err != nil {
			return nil, fmt.Errorf("domain %s: reading %s+%#x at %#x: %w", d.Name, je.Symbol, je.Offset, je.VA, err)
		}
		switch {
		case string(cur) == string(je.New):
			allOld = false
		case string(cur) == string(je.Old):
			continue // this edit is already undone
		default:
			return nil, fmt.Errorf("domain %s: cannot revert %s: %s+%#x (%#x) holds % x, neither the patched % x nor the original % x",
				d.Name, id, je.Symbol, je.Offset, je.VA, cur, []byte(je.New), []byte(je.Old))
		}
		// Reverting is applying the edit backwards.
		pl.Edits = append(pl.Edits, PlannedEdit{Index: i, Kind: je.Kind, Symbol: je.Symbol, Offset: je.Offset, VA: je.VA,
			Old: je.New, New: je.Old, Chunks: reverseChunks(je.Chunks)})
	}
	res := &Result{PatchID: id, Plan: pl, Reconciled: st.Differences()}
	hasReplace := false
	for _, je := range jp.Edits {
		hasReplace = hasReplace || je.Kind == KindReplace
	}
	if allOld && !hasReplace {
		j.remove(id)
		if err := pt.State.Save(j); err != nil {
			return nil, err
		}
		res.NoOp, res.Message = true, fmt.Sprintf("patch %s was no longer in the memory of domain %s; removed from the journal", id, d.Name)
		return res, nil
	}
	if !allOld {
		jp.State = StateReverting
		if err := pt.State.Save(j); err != nil {
			return nil, err
		}
		fr, err := writeUnderFreeze(ctx, d, pl, true)
		res.Freeze = fr
		if err != nil {
			jp.State = StateApplied
			if serr := pt.State.Save(j); serr != nil {
				err = fmt.Errorf("%w (and the journal could not be updated: %v)", err, serr)
			}
			return res, fmt.Errorf("domain %s: reverting %s: %w", d.Name, id, err)
		}
	}
	released := ""
	if hasReplace {
		// The jumps are gone; the code is released in later stops, once
		// nothing runs in it any more.
		jp.State = StateReleasing
		if err := pt.State.Save(j); err != nil {
			return res, err
		}
		t0 := time.Now()
		waits, err := releaseReplaced(ctx, d, jp)
		res.ReleaseTime, res.ReleaseWaits = time.Since(t0), waits
		if err != nil {
			return res, fmt.Errorf("domain %s: patch %s: the jumps are removed (the guest runs its original code) but the replacement could not be released from the code area: %w; revert again to retry", d.Name, id, err)
		}
		released = fmt.Sprintf("; replacement code released from the code area in %v (%d retries while in use)", res.ReleaseTime.Round(time.Millisecond), waits)
	}
	j.remove(id)
	if err := pt.State.Save(j); err != nil {
		return res, fmt.Errorf("domain %s: patch %s is reverted but the journal could not be saved: %w", d.Name, id, err)
	}
	if allOld {
		res.Message = fmt.Sprintf("patch %s reverted on domain %s: the jumps were already gone%s", id, d.Name, released)
	} else {
		res.Message = fmt.Sprintf("patch %s reverted on domain %s, guest frozen %v (%s)%s", id, d.Name, res.Freeze.Window, res.Freeze.Method, released)
	}
	return res, nil
}

func reverseChunks(cs []Chunk) []Chunk {
	out := make([]Chunk, len(cs))
	for i, c := range cs {
		out[i] = Chunk{VA: c.VA, GPA: c.GPA, Old: c.New, New: c.Old}
	}
	return out
}

// writeUnderFreeze stops the guest, re-verifies every chunk, writes them
// all, reads them back and resumes. On any failure it restores what it wrote
// before resuming. Resume happens on every path, panics included.
// A revert skips the RIP check: it puts back the instructions the guest
// had, which are whole at their boundaries.
func writeUnderFreeze(ctx context.Context, d Domain, pl *Plan, revert bool) (fr FreezeReport, err error) {
	needRIPs := !revert && pl.NeedsRIPCheck()
	sg, err := d.Writer.Stop(ctx)
	if err != nil {
		return fr, fmt.Errorf("freezing the guest with %s: %w", d.Writer.Name(), err)
	}
	resumed := false
	defer func() {
		if !resumed {
			r, rerr := sg.Resume()
			fr = r
			if rerr != nil {
				err = errors.Join(err, fmt.Errorf("resuming the guest: %w", rerr))
			}
		}
	}()
	if needRIPs {
		if err := checkRIPs(ctx, sg, pl); err != nil {
			return fr, err
		}
	}
	var all []Chunk
	for _, e := range pl.Edits {
		all = append(all, e.Chunks...)
	}
	for _, c := range all {
		cur := make([]byte, len(c.Old))
		if err := sg.Read(c.VA, c.GPA, cur); err != nil {
			return fr, fmt.Errorf("re-reading %#x inside the freeze: %w", c.VA, err)
		}
		if string(cur) != string(c.Old) {
			return fr, fmt.Errorf("bytes at %#x changed before the freeze: expected % x, found % x", c.VA, c.Old, cur)
		}
	}
	// Replacement code goes into the code area first: complete and
	// verified before any jump leads to it.
	undoInstall := func() error { return nil }
	if !revert {
		u, err := installReplacements(sg, pl)
		if err != nil {
			return fr, fmt.Errorf("installing the replacement code: %w", err)
		}
		undoInstall = u
	}
	written := 0
	restore := func(cause error) error {
		var errs []error
		for _, c := range all[:written] {
			if err := sg.Write(c.VA, c.GPA, c.Old); err != nil {
				errs = append(errs, fmt.Errorf("restoring %#x: %w", c.VA, err))
				continue
			}
			back := make([]byte, len(c.Old))
			if err := sg.Read(c.VA, c.GPA, back); err != nil || string(back) != string(c.Old) {
				errs = append(errs, fmt.Errorf("restoring %#x: read back % x, want % x (%v)", c.VA, back, c.Old, err))
			}
		}
		if err := undoInstall(); err != nil {
			errs = append(errs, err)
		}
		if len(errs) > 0 {
			return fmt.Errorf("%w; RESTORE FAILED, guest memory may hold a partial patch: %w", cause, errors.Join(errs...))
		}
		return fmt.Errorf("%w; the original bytes were restored", cause)
	}
	defer func() {
		if r := recover(); r != nil {
			err = restore(fmt.Errorf("panic inside the freeze: %v", r))
		}
	}()
	for _, c := range all {
		written++ // a failed write may have changed part of the range
		if err := sg.Write(c.VA, c.GPA, c.New); err != nil {
			return fr, restore(fmt.Errorf("writing % x at %#x: %w", c.New, c.VA, err))
		}
	}
	for _, c := range all {
		back := make([]byte, len(c.New))
		if err := sg.Read(c.VA, c.GPA, back); err != nil {
			return fr, restore(fmt.Errorf("reading back %#x: %w", c.VA, err))
		}
		if string(back) != string(c.New) {
			return fr, restore(fmt.Errorf("read back % x at %#x, wrote % x", back, c.VA, c.New))
		}
	}
	resumed = true
	fr, err = sg.Resume()
	if err != nil {
		return fr, fmt.Errorf("resuming the guest after writing: %w", err)
	}
	return fr, nil
}

// checkRIPs refuses the write while any vCPU executes strictly inside the
// instructions an edit spans.
func checkRIPs(ctx context.Context, sg StoppedGuest, pl *Plan) error {
	cpus, err := sg.Registers(ctx)
	if errors.Is(err, hypervisor.ErrNoRegisters) {
		return fmt.Errorf("an edit spans several instructions and the writer cannot read vCPU registers while stopped; use a writer that stops the VM through the monitor (gdbstub or direct+suspend)")
	}
	if err != nil {
		return fmt.Errorf("reading vCPU RIPs: %w", err)
	}
	if len(cpus) == 0 {
		return fmt.Errorf("reading vCPU RIPs: none returned")
	}
	rips := make([]uint64, len(cpus))
	for i, c := range cpus {
		rips[i] = c.RIP
	}
	var bad []string
	for _, e := range pl.Edits {
		if !e.RIPCheck {
			continue
		}
		for cpu, rip := range rips {
			if rip > e.CheckStart && rip < e.CheckEnd {
				bad = append(bad, fmt.Sprintf("vCPU %d at %#x inside %s %#x..%#x", cpu, rip, e.Symbol, e.CheckStart, e.CheckEnd))
			}
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("refused: %s", strings.Join(bad, ", "))
	}
	return nil
}

func memState(st *Status, id string) string {
	for _, ps := range st.Patches {
		if ps.Entry.ID == id {
			return ps.Memory
		}
	}
	return "nothing known"
}
