package patcher

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/codearea"
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
	// RegisterWriter, when set, is a writer whose stops can read the vCPU
	// registers, used for what needs them (the activeness check of
	// consistency: stack, releasing replaced code) when Writer's stops
	// cannot: OpenLive sets direct+suspend beside direct+ptrace.
	RegisterWriter CodeWriter
}

// withRegisters is d written through its RegisterWriter when its Writer's
// stops cannot read registers and it has one; d otherwise.
func (d Domain) withRegisters() Domain {
	if w, err := stopWriter(d, true); err == nil {
		d.Writer = w
	}
	return d
}

// Patcher applies and reverts patches, keeping journals in State.
type Patcher struct {
	State StateDir
	Now   func() time.Time // for tests; time.Now when nil

	// activity replaces the activeness check's scan (tests).
	activity func(ctx context.Context, sg StoppedGuest, rips, stacks []codearea.Span) (*codearea.Activity, error)
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
	// Consistency reports the activeness check (consistency: stack).
	Consistency *ConsistencyReport
	// Superseded lists the patches the apply replaced (replaces:).
	Superseded []string
}

// ApplyOptions change Apply.
type ApplyOptions struct {
	PlanOptions
	// Consistency bounds the retries of consistency: stack.
	Consistency ConsistencyOptions
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
	flushTranslations(d.Target)
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
func (pt *Patcher) Apply(ctx context.Context, d Domain, p *Patch, opt ApplyOptions) (_ *Result, retErr error) {
	defer func() { retErr = settleWriters(d, retErr) }()
	lock, j, st, err := pt.begin(d)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	// A patch whose modules are not all loaded puts its kernel image part
	// in alone (journal state module gone), as livepatch patches vmlinux
	// at once and a module when it loads.
	final := StateApplied
	missing, _, _ := MissingModules(d.Target, p)
	if len(missing) > 0 {
		kp, err := p.KernelPart()
		if err != nil {
			return nil, fmt.Errorf("domain %s: patch %s: module %s is not loaded in the guest; %w", d.Name, p.ID, strings.Join(missing, ", "), err)
		}
		p, final = kp, StateModuleGone
	}
	var carried map[uint64]JournalEdit // kernel edits of a module-gone apply, still in place
	if old := j.Find(p.ID); old != nil && old.State == StateModuleGone {
		// Applied before to a module since unloaded: its code leaves the
		// code area first (the entries' names are the ones used again).
		if _, _, err := releaseGoneModule(ctx, d.withRegisters(), old); err != nil {
			return nil, fmt.Errorf("domain %s: patch %s: the code of its apply to the unloaded module is still in the code area: %w", d.Name, p.ID, err)
		}
		carried = kernelEditsInPlace(d.Target, old)
		if final == StateModuleGone && len(carried) == len(p.Edits) && len(carried) == len(kernelEdits(old)) {
			return &Result{PatchID: p.ID, NoOp: true, Reconciled: st.Differences(), Message: fmt.Sprintf(
				"patch %s: its %d kernel edit(s) are applied on domain %s; its edits of module %s wait for the module",
				p.ID, len(p.Edits), d.Name, strings.Join(missing, ", "))}, nil
		}
		j.remove(p.ID)
	}
	pl, err := pt.plan(d, j, st.BootID, p, opt.PlanOptions)
	if err != nil {
		return nil, err
	}
	// The kernel image's edits of a patch that also edits a module stay
	// when the module goes (as livepatch keeps vmlinux's part): they are
	// carried into this apply, which writes only the module's edits.
	for i, e := range pl.Edits {
		if !e.Applied || carried == nil {
			continue
		}
		je, ok := carried[e.VA]
		if !ok || string(je.New) != string(e.New) {
			return nil, fmt.Errorf("domain %s: patch %s is partly applied (%s+%#x holds the new bytes, but its last apply did not leave them there); revert or reconcile first", d.Name, p.ID, e.Symbol, e.Offset)
		}
		// What a revert puts back is what that apply found.
		pl.Edits[i].Old, pl.Edits[i].Chunks = je.Old, je.Chunks
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
		j.put(pt.entry(pl, final, "", 0))
		if err := pt.State.Save(j); err != nil {
			return nil, err
		}
		res.NoOp, res.Message = true, fmt.Sprintf("patch %s is already applied on domain %s (found in guest memory; journal updated)", p.ID, d.Name)
		return res, nil
	}
	for _, e := range pl.Edits {
		if e.Applied && carried == nil {
			return nil, fmt.Errorf("domain %s: patch %s is partly applied (%s+%#x already holds the new bytes); revert or reconcile first", d.Name, p.ID, e.Symbol, e.Offset)
		}
	}
	wd := d
	if p.StackConsistency() {
		if wd.Writer, err = stopWriter(d, true); err != nil {
			return nil, fmt.Errorf("domain %s: patch %s: %w; use the gdbstub or direct+suspend writer", d.Name, p.ID, err)
		}
	}
	// Journal first: a crash between here and the next save leaves a
	// pending entry that reconcile resolves by reading the guest.
	j.put(pt.entry(pl, StatePending, wd.Writer.Name(), 0))
	if err := pt.State.Save(j); err != nil {
		return nil, err
	}
	var fr FreezeReport
	if p.StackConsistency() {
		fr, res.Consistency, err = pt.writeConsistent(ctx, wd, pl, opt.Consistency)
	} else {
		fr, err = writeUnderFreeze(ctx, wd, pl, false)
	}
	res.Freeze = fr
	if err != nil {
		j.remove(p.ID)
		if serr := pt.State.Save(j); serr != nil {
			err = fmt.Errorf("%w (and the journal could not be updated: %v)", err, serr)
		}
		return res, fmt.Errorf("domain %s: applying %s: %w", d.Name, p.ID, err)
	}
	entry := pt.entry(pl, final, wd.Writer.Name(), fr.Window)
	if res.Consistency != nil {
		entry.Tries = res.Consistency.Tries
	}
	j.put(entry)
	for _, sp := range pl.Supersedes {
		jp := j.Find(sp.ID)
		jp.SupersededBy, jp.State = p.ID, StateSuperseded
		if hasReplace(jp) {
			jp.State = StateReleasing // until its code is released, below
		}
		res.Superseded = append(res.Superseded, sp.ID)
	}
	if err := pt.State.Save(j); err != nil {
		return res, fmt.Errorf("domain %s: patch %s is applied but the journal could not be saved: %w", d.Name, p.ID, err)
	}
	res.Message = fmt.Sprintf("patch %s applied on domain %s: %d edit(s), guest frozen %v (%s)", p.ID, d.Name, len(pl.Edits), fr.Window, fr.Method)
	if final == StateModuleGone {
		res.Message += fmt.Sprintf("; these are its kernel edits: its edits of module %s wait for the module", strings.Join(missing, ", "))
	}
	if c := res.Consistency; c != nil {
		res.Message += fmt.Sprintf("; consistency: stack checked in %d stop(s) through %s", c.Tries, c.Writer)
	}
	if len(pl.Supersedes) > 0 {
		res.Message += fmt.Sprintf("; superseded %s in the same stop", pl.supersededText())
		t0 := time.Now()
		n, waits, err := pt.releaseSuperseded(ctx, d, j, p.ID)
		res.ReleaseTime, res.ReleaseWaits = time.Since(t0), waits
		switch {
		case err != nil:
			res.Message += fmt.Sprintf("; their replacement code is still in the code area (%v): revert them to release it later", err)
		case n > 0:
			res.Message += fmt.Sprintf(", their code released in %v (%d retries while in use)", res.ReleaseTime.Round(time.Millisecond), waits)
		}
	}
	return res, nil
}

// Plan is MakePlan against the domain's journal: the patches p lists in
// replaces: and has applied are planned to be superseded, and a function
// another applied patch owns is refused. It reads guest memory and the
// journal and writes neither (a dry run).
func (pt *Patcher) Plan(d Domain, p *Patch, opt PlanOptions) (*Plan, error) {
	j, err := pt.State.Load(d.Name, d.UUID)
	if err != nil {
		return nil, err
	}
	flushTranslations(d.Target)
	bootID, err := BootIdentity(d.Target)
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	if missing, _, _ := MissingModules(d.Target, p); len(missing) > 0 {
		if kp, err := p.KernelPart(); err == nil {
			p = kp // what Apply writes now (its kernel edits)
		}
	}
	return pt.plan(d, j, bootID, p, opt)
}

// flushTranslations drops the live kernel's cached page translations
// before an operation reads and plans: the guest changes its page tables
// (vmalloc, and modules: an unloaded module's addresses come back mapped
// to other pages when it or another one is loaded there), and a stale
// translation would read, and write, a page that is no longer there.
func flushTranslations(t Target) {
	if kh, ok := t.(KernelHolder); ok {
		if k := kh.Kernel(); k != nil && k.AS != nil {
			k.AS.Flush()
		}
	}
}

func (pt *Patcher) plan(d Domain, j *Journal, bootID string, p *Patch, opt PlanOptions) (*Plan, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if err := checkOwners(d.Target, j, p, bootID); err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	sup, err := supersedeList(j, p, bootID)
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	opt.Supersede = sup
	pl, err := MakePlan(d.Target, p, opt)
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	return pl, nil
}

// releaseSuperseded releases the code of the patches superseded by id
// whose release is pending; released ones become history ("superseded").
// The journal is saved.
func (pt *Patcher) releaseSuperseded(ctx context.Context, d Domain, j *Journal, id string) (released, waits int, err error) {
	var errs []error
	for i := range j.Patches {
		jp := &j.Patches[i]
		if jp.SupersededBy != id || jp.State != StateReleasing {
			continue
		}
		n, rerr := releaseReplaced(ctx, d.withRegisters(), jp)
		waits += n
		if rerr != nil {
			errs = append(errs, fmt.Errorf("%s: %w", jp.ID, rerr))
			continue
		}
		jp.State = StateSuperseded
		released++
	}
	if err := pt.State.Save(j); err != nil {
		errs = append(errs, err)
	}
	return released, waits, errors.Join(errs...)
}

func hasReplace(jp *JournalPatch) bool {
	for _, je := range jp.Edits {
		if je.Kind == KindReplace {
			return true
		}
	}
	return false
}

// ModuleGoneReport is what ReleaseModuleGone did.
type ModuleGoneReport struct {
	Status *Status
	// Gone lists the patches in state module gone; Released the
	// code-area entries released now.
	Gone     []string
	Released []string
	Waits    int
}

// ReleaseModuleGone reconciles the domain's journal (patches whose module
// was unloaded become StateModuleGone) and releases the code-area entries
// of those patches once nothing runs in them. The entries stay in the
// journal (state module gone) until the patch is applied again or
// reverted.
func (pt *Patcher) ReleaseModuleGone(ctx context.Context, d Domain) (_ *ModuleGoneReport, retErr error) {
	defer func() { retErr = settleWriters(d, retErr) }()
	lock, j, st, err := pt.begin(d)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	rep := &ModuleGoneReport{Status: st}
	var errs []error
	for i := range j.Patches {
		jp := &j.Patches[i]
		if jp.State != StateModuleGone {
			continue
		}
		rep.Gone = append(rep.Gone, jp.ID)
		if !goneEntriesPlaced(d.Target, jp) {
			continue
		}
		released, waits, err := releaseGoneModule(ctx, d.withRegisters(), jp)
		rep.Released = append(rep.Released, released...)
		rep.Waits += waits
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", jp.ID, err))
		}
	}
	return rep, errors.Join(errs...)
}

// checkOtherPatches refuses edits overlapping those of another applied patch.
func checkOtherPatches(j *Journal, pl *Plan) error {
	for _, jp := range j.Patches {
		if jp.ID == pl.Patch.ID || jp.BootID != pl.BootID || jp.SupersededBy != "" || jp.State == StateModuleGone || pl.Patch.Supersedes(jp.ID) {
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
		Consistency: pl.Patch.Consistency, Supersedes: ids(pl.Supersedes),
	}
}

func ids(jps []JournalPatch) []string {
	var out []string
	for _, jp := range jps {
		out = append(out, jp.ID)
	}
	return out
}

// Revert restores the original bytes of an applied patch, after checking
// that the patched bytes are still there.
func (pt *Patcher) Revert(ctx context.Context, d Domain, id string) (_ *Result, retErr error) {
	defer func() { retErr = settleWriters(d, retErr) }()
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
	if jp.State == StateModuleGone {
		res := &Result{PatchID: id, NoOp: true, Reconciled: st.Differences()}
		released, waits, err := releaseGoneModule(ctx, d.withRegisters(), jp)
		res.ReleaseWaits = waits
		if err != nil {
			return res, fmt.Errorf("domain %s: patch %s: its module is gone but its replacement code could not be released: %w; revert again to retry", d.Name, id, err)
		}
		if kernel := kernelEdits(jp); len(kernel) > 0 {
			// Its kernel image edits outlived the module: they are
			// reverted as those of an applied patch, below.
			jp.Edits, jp.State = kernel, StateApplied
			return pt.revertApplied(ctx, d, j, st, jp)
		}
		j.remove(id)
		if err := pt.State.Save(j); err != nil {
			return res, err
		}
		res.Message = fmt.Sprintf("patch %s: its module was unloaded (nothing left to restore); removed from the journal of domain %s", id, d.Name)
		if len(released) > 0 {
			res.Message += fmt.Sprintf(", code-area entries %s released", strings.Join(released, ", "))
		}
		return res, nil
	}
	if jp.SupersededBy != "" && jp.State != StateReleasing {
		return nil, fmt.Errorf("domain %s: patch %s was superseded by %s (replaces:), which holds its functions now; revert %s to restore the original functions", d.Name, id, jp.SupersededBy, jp.SupersededBy)
	}
	if jp.State != StateApplied && jp.State != StateReleasing {
		return nil, fmt.Errorf("domain %s: patch %s is in state %s with memory holding %s; it needs attention before a revert", d.Name, id, jp.State, memState(st, id))
	}
	return pt.revertApplied(ctx, d, j, st, jp)
}

// revertApplied reverts jp, an entry of j in state applied or releasing:
// the jumps out in one stop, then its code-area entries released.
func (pt *Patcher) revertApplied(ctx context.Context, d Domain, j *Journal, st *Status, jp *JournalPatch) (*Result, error) {
	id := jp.ID
	pl := &Plan{Patch: &Patch{ID: jp.ID, Description: jp.Description}, Release: jp.Release, BuildID: jp.BuildID, BootID: jp.BootID}
	allOld := true
	for i, je := range jp.Edits {
		if jp.SupersededBy != "" {
			break // its sites are the superseding patch's: only its code is left to release
		}
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
		waits, err := releaseReplaced(ctx, d.withRegisters(), jp)
		res.ReleaseTime, res.ReleaseWaits = time.Since(t0), waits
		if err != nil {
			return res, fmt.Errorf("domain %s: patch %s: the jumps are removed (the guest runs its original code) but the replacement could not be released from the code area: %w; revert again to retry", d.Name, id, err)
		}
		released = fmt.Sprintf("; replacement code released from the code area in %v (%d retries while in use)", res.ReleaseTime.Round(time.Millisecond), waits)
	}
	j.remove(id)
	released += pt.dropSuperseded(ctx, d, j, id)
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

// dropSuperseded forgets the patches id had superseded, now that id is
// reverted and their functions are original again; code of theirs still
// waiting for release is released first (kept, state releasing, if busy).
// It returns a note for the message.
func (pt *Patcher) dropSuperseded(ctx context.Context, d Domain, j *Journal, id string) string {
	var dropped, kept []string
	var keep []JournalPatch
	for _, jp := range j.Patches {
		if jp.SupersededBy != id {
			keep = append(keep, jp)
			continue
		}
		if jp.State == StateReleasing {
			if _, err := releaseReplaced(ctx, d.withRegisters(), &jp); err != nil {
				kept = append(kept, fmt.Sprintf("%s (its code is still in use: %v; revert %s to retry)", jp.ID, err, jp.ID))
				keep = append(keep, jp)
				continue
			}
		}
		dropped = append(dropped, jp.ID)
	}
	j.Patches = keep
	note := ""
	if len(dropped) > 0 {
		note += fmt.Sprintf("; the patches it had superseded (%s) are gone too", strings.Join(dropped, ", "))
	}
	if len(kept) > 0 {
		note += "; kept: " + strings.Join(kept, "; ")
	}
	return note
}

func reverseChunks(cs []Chunk) []Chunk {
	out := make([]Chunk, len(cs))
	for i, c := range cs {
		out[i] = Chunk{VA: c.VA, GPA: c.GPA, Old: c.New, New: c.Old}
	}
	return out
}

// settleWriters waits for the checks a writer runs after its stop has
// ended (the gdbstub writer confirms with QEMU, off the freeze window, that
// the VM runs again) and adds their errors to err.
func settleWriters(d Domain, err error) error {
	for _, w := range []CodeWriter{d.Writer, d.RegisterWriter} {
		if s, ok := w.(interface{ Settle() error }); ok {
			if serr := s.Settle(); serr != nil {
				err = errors.Join(err, serr)
			}
		}
	}
	return err
}

// writeUnderFreeze stops the guest, re-verifies every chunk, writes them
// all, reads them back and resumes. On any failure it restores what it wrote
// before resuming. Resume happens on every path, panics included.
// A revert skips the RIP check: it puts back the instructions the guest
// had, which are whole at their boundaries.
func writeUnderFreeze(ctx context.Context, d Domain, pl *Plan, revert bool) (fr FreezeReport, err error) {
	return writeStop(ctx, d, pl, revert, nil)
}

// writeStop is writeUnderFreeze with a check that runs first inside the
// stop (the activeness check of consistency: stack): when it fails, nothing
// is written and the guest resumes.
func writeStop(ctx context.Context, d Domain, pl *Plan, revert bool, check func(StoppedGuest) error) (fr FreezeReport, err error) {
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
	if check != nil {
		if err := check(sg); err != nil {
			return fr, err
		}
	}
	var all []Chunk
	for _, e := range pl.Edits {
		if e.Applied && !revert {
			continue // carried over from the patch's last apply (Apply)
		}
		all = append(all, e.stopChunks()...)
	}
	if !revert {
		for _, e := range pl.Undo { // edits of superseded patches put back
			all = append(all, e.Chunks...)
		}
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
