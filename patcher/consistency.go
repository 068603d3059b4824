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

// The activeness check (consistency: stack), after Ksplice: a function may
// only be switched when no task is in the middle of it. Inside the apply's
// stop, before anything is written, every vCPU's RIP and every live kernel
// stack are searched (codearea.FindActivity: thread stacks, and the IRQ or
// exception stack a vCPU is on) for an address inside a function the patch
// changes at its entry (replace and return edits, [addr, addr+size) from
// kallsyms) or inside the code of a patch it supersedes. While one is
// found, the guest resumes untouched, the apply backs off (10 ms, growing
// to 50 ms) and tries again, up to ConsistencyOptions' bounds; then it is
// refused naming the tasks and functions.
//
// The check needs the vCPUs' registers during the stop. Writers whose stops
// cannot read them (direct+ptrace: the monitor must not be called while its
// vCPU threads are held) use Domain.RegisterWriter for such an apply
// (OpenLive sets direct+suspend: a libvirt suspend instead of the ptrace
// freeze, milliseconds instead of microseconds); without one the apply is
// refused.

// ConsistencyOptions bound the activeness check's retries.
type ConsistencyOptions struct {
	Tries  int           // stops tried before refusing; 20 when 0
	Budget time.Duration // time allowed for them; 5 s when 0
	// MinBackoff and MaxBackoff bound the wait between tries (10 and
	// 50 ms when 0); it grows by half each try.
	MinBackoff, MaxBackoff time.Duration
}

func (o ConsistencyOptions) withDefaults() ConsistencyOptions {
	if o.Tries <= 0 {
		o.Tries = 20
	}
	if o.Budget <= 0 {
		o.Budget = 5 * time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 10 * time.Millisecond
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(o.MinBackoff, 50*time.Millisecond)
	}
	return o
}

// backoff is the wait after the try-th refused check (1-based).
func (o ConsistencyOptions) backoff(try int) time.Duration {
	d := o.MinBackoff
	for i := 1; i < try && d < o.MaxBackoff; i++ {
		d += d / 2
	}
	return min(d, o.MaxBackoff)
}

// ConsistencyReport says what the activeness check did.
type ConsistencyReport struct {
	Writer string // the writer whose stops were used
	Tries  int    // stops made (the last one wrote, unless refused)
	// Checks is the time each check took inside its stop (registers and
	// the stack scan); Windows the whole stop of each try.
	Checks, Windows []time.Duration
	Waited          time.Duration // backing off between tries
	// Last is what the last check found (empty when the switch was made).
	Last *codearea.Activity
	// Spans is what was searched for.
	Spans []string
}

// ActiveError refuses an apply whose functions stayed in use.
type ActiveError struct {
	Patch    string
	Tries    int
	Elapsed  time.Duration
	Activity *codearea.Activity
}

func (e *ActiveError) Error() string {
	var parts []string
	parts = append(parts, e.Activity.Tasks()...)
	for _, u := range e.Activity.Uses {
		if !u.Thread() {
			parts = append(parts, u.Span+": "+u.String())
		}
	}
	return fmt.Sprintf("patch %s not applied (consistency: stack): after %d tries over %v, functions it changes are still in use: %s; "+
		"guest memory is unchanged, apply again once those tasks have left them",
		e.Patch, e.Tries, e.Elapsed.Round(time.Millisecond), strings.Join(parts, "; "))
}

// errBusyFunctions marks one refused check (retried).
type busyError struct{ act *codearea.Activity }

func (e *busyError) Error() string { return "functions in use" }

// activitySpans lists what the check searches: the functions pl changes
// at their entry (RIPs in [addr, addr+size); return addresses in
// (addr, addr+size], a call at a function's very end returning to its
// size), and the code-area text of superseded patches.
func activitySpans(t Target, pl *Plan) (rips, stacks []codearea.Span, err error) {
	seen := map[uint64]bool{}
	for _, e := range pl.Edits {
		if e.Kind != KindReplace && e.Kind != KindReturn || e.Applied || seen[e.SymbolAddr] {
			continue // an applied edit is carried over, not switched now
		}
		seen[e.SymbolAddr] = true
		if e.SymbolSize == 0 {
			return nil, nil, fmt.Errorf("consistency: stack: the size of %s is not known, so its activeness cannot be checked", e.Symbol)
		}
		lo, hi := e.SymbolAddr, e.SymbolAddr+e.SymbolSize
		rips = append(rips, codearea.Span{Name: e.Symbol, Lo: lo, Hi: hi})
		stacks = append(stacks, codearea.Span{Name: e.Symbol, Lo: lo + 1, Hi: hi + 1})
	}
	var entries map[string]codearea.Entry
	var area *codearea.Area
	for _, jp := range pl.Supersedes {
		done := map[string]bool{}
		for _, je := range jp.Edits {
			if je.Kind != KindReplace || je.AreaEntry == "" || done[je.AreaEntry] {
				continue
			}
			done[je.AreaEntry] = true
			if area == nil {
				kh, ok := t.(KernelHolder)
				if !ok || kh.Kernel() == nil {
					return nil, nil, fmt.Errorf("consistency: stack: superseding %s needs the live guest kernel (its code area)", jp.ID)
				}
				if area, err = codearea.Find(kh.Kernel()); err != nil {
					return nil, nil, err
				}
				entries = map[string]codearea.Entry{}
				for _, e := range area.Entries() {
					entries[e.Name] = e
				}
			}
			ent, ok := entries[je.AreaEntry]
			if !ok {
				continue
			}
			lo := area.TextVA(ent.TextPage)
			s := codearea.Span{Name: fmt.Sprintf("%s's code (%s)", jp.ID, je.AreaEntry), Lo: lo, Hi: lo + uint64(ent.TextPages)*4096}
			rips = append(rips, s)
			s.Hi++
			stacks = append(stacks, s)
		}
	}
	return rips, stacks, nil
}

// stopWriter is the writer for an apply: the domain's, or for a check that
// needs registers its RegisterWriter when the domain's stops cannot read
// them.
func stopWriter(d Domain, needRegisters bool) (CodeWriter, error) {
	if !needRegisters || d.Writer.Capabilities().Registers {
		return d.Writer, nil
	}
	if d.RegisterWriter != nil && d.RegisterWriter.Capabilities().Registers {
		return d.RegisterWriter, nil
	}
	return nil, fmt.Errorf("consistency: stack reads every vCPU's registers during the stop, which the %s writer cannot (%w)", d.Writer.Name(), hypervisor.ErrNoRegisters)
}

// findActivity runs the scan during the stop sg.
func (pt *Patcher) findActivity(ctx context.Context, t Target, sg StoppedGuest, rips, stacks []codearea.Span) (*codearea.Activity, error) {
	if pt.activity != nil {
		return pt.activity(ctx, sg, rips, stacks)
	}
	kh, ok := t.(KernelHolder)
	if !ok || kh.Kernel() == nil {
		return nil, fmt.Errorf("consistency: stack needs a live guest kernel (its task list and stacks)")
	}
	cpus, err := sg.Registers(ctx)
	if err != nil {
		return nil, fmt.Errorf("consistency: stack: reading the vCPUs' registers during the stop: %w", err)
	}
	act, err := codearea.FindActivity(kh.Kernel(), cpus, rips, stacks)
	if err != nil {
		return nil, fmt.Errorf("consistency: stack: %w", err)
	}
	return act, nil
}

// writeConsistent is the apply's stop with the activeness check: tried
// until the check passes (then the edits are written in that same stop) or
// the bounds run out (then nothing was written).
func (pt *Patcher) writeConsistent(ctx context.Context, d Domain, pl *Plan, opt ConsistencyOptions) (FreezeReport, *ConsistencyReport, error) {
	opt = opt.withDefaults()
	rips, stacks, err := activitySpans(d.Target, pl)
	if err != nil {
		return FreezeReport{}, nil, err
	}
	rep := &ConsistencyReport{Writer: d.Writer.Name()}
	for _, s := range rips {
		rep.Spans = append(rep.Spans, s.Name)
	}
	start := time.Now()
	for try := 1; ; try++ {
		var act *codearea.Activity
		check := func(sg StoppedGuest) error {
			t0 := time.Now()
			a, err := pt.findActivity(ctx, d.Target, sg, rips, stacks)
			rep.Checks = append(rep.Checks, time.Since(t0))
			if err != nil {
				return err
			}
			if act = a; len(a.Uses) > 0 {
				return &busyError{a}
			}
			return nil
		}
		fr, err := writeStop(ctx, d, pl, false, check)
		rep.Tries, rep.Last = try, act
		rep.Windows = append(rep.Windows, fr.Window)
		var busy *busyError
		if !errors.As(err, &busy) {
			if err == nil {
				rep.Last = nil
			}
			return fr, rep, err
		}
		elapsed := time.Since(start)
		wait := opt.backoff(try)
		if try >= opt.Tries || elapsed+wait > opt.Budget {
			return fr, rep, &ActiveError{Patch: pl.Patch.ID, Tries: try, Elapsed: elapsed, Activity: busy.act}
		}
		select {
		case <-ctx.Done():
			return fr, rep, errors.Join(&ActiveError{Patch: pl.Patch.ID, Tries: try, Elapsed: elapsed, Activity: busy.act}, ctx.Err())
		case <-time.After(wait):
		}
		rep.Waited += wait
	}
}
