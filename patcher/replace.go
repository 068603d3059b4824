package patcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
)

// A replace edit redirects a kernel function to new code: the object is
// linked against the guest's symbols into the code area (codearea), and the
// function's fentry NOP becomes "jmp rel32" to the replacement. The apply
// installs the code and the jump in one freeze (code first); the revert
// removes the jump in one freeze and releases the code in later ones, once
// no vCPU or kernel stack still uses it.

// KernelHolder is a Target backed by a guest kernel found by introspect;
// replace edits need it (the code area lives in the guest's page tables).
type KernelHolder interface {
	Kernel() *introspect.Kernel
}

// Kernel returns the introspected kernel.
func (t KernelTarget) Kernel() *introspect.Kernel { return t.K }

// ReplacePlan is the code-area side of a planned replace edit.
type ReplacePlan struct {
	Object    string // the object file as read
	With      string // the replacement symbol, also the area entry's name
	Area      *codearea.Area
	Placement *codearea.Placement // nil when the edit is already applied
	// LinkMap is the link (sections, addresses, resolved relocations).
	LinkMap *linker.LinkMap
	// Writes is what installing the placement writes, in order (for the
	// rollback inside the freeze and for a dry run).
	Writes []codearea.PageWrite
}

// LinkMapText is the link map formatted for people.
func (r *ReplacePlan) LinkMapText() string {
	if r == nil || r.LinkMap == nil {
		return ""
	}
	var b strings.Builder
	r.LinkMap.Format(&b)
	return b.String()
}

// ReleaseWait bounds how long a revert waits for replaced code to fall out
// of use before it gives up (the jump is then already gone).
var ReleaseWait = 10 * time.Second

// planReplace links the object into the guest's code area and prepares the
// jump at the function's fentry site. Nothing is written.
func planReplace(t Target, p *Patch, e *Edit) (PlannedEdit, error) {
	kh, ok := t.(KernelHolder)
	if !ok || kh.Kernel() == nil {
		return PlannedEdit{}, fmt.Errorf("replace edits need a live guest kernel (its page tables hold the code area)")
	}
	k := kh.Kernel()
	sym, err := uniqueSymbol(t, e.Function)
	if err != nil {
		return PlannedEdit{}, err
	}
	path := p.ObjectPath(e)
	obj, err := linker.Load(path)
	if err != nil {
		return PlannedEdit{}, fmt.Errorf("object %s: %w", path, err)
	}
	area, err := codearea.Find(k)
	if err != nil {
		return PlannedEdit{}, err
	}
	head := make([]byte, len(Endbr64)+SiteLen)
	if err := t.ReadVirt(sym.Addr, head); err != nil {
		return PlannedEdit{}, fmt.Errorf("reading the entry of %s at %#x: %w", sym.Name, sym.Addr, err)
	}
	off := uint64(0)
	if bytes.HasPrefix(head, Endbr64) {
		off = uint64(len(Endbr64))
	}
	site := sym.Addr + off
	cur := head[off : off+SiteLen]
	rp := &ReplacePlan{Object: path, With: e.With, Area: area}
	pe := PlannedEdit{Kind: KindReplace, Symbol: sym.Name, SymbolAddr: sym.Addr, Offset: off, VA: site,
		Old: append([]byte(nil), FentryNop...), Replace: rp}

	if ent, placed := area.Entry(e.With); placed {
		// Applied already if the site jumps to the placed entry.
		if to, isJump := codearea.JumpTarget(site, cur); isJump && to == ent.Entry && ent.Site == site {
			pe.New, pe.Applied = append([]byte(nil), cur...), true
			pe.Before, _ = introspect.Disassemble(pe.Old, site)
			pe.After, _ = introspect.Disassemble(pe.New, site)
			return pe, nil
		}
		return PlannedEdit{}, fmt.Errorf("%s is already placed in the code area (entry %#x) but %s's site %#x holds % x: a half-done replace; revert or reconcile first",
			e.With, ent.Entry, sym.Name, site, cur)
	}
	if !bytes.Equal(cur, FentryNop) {
		return PlannedEdit{}, fmt.Errorf("the fentry site of %s at %#x (%s+%#x) is not free: found % x, want the NOP % x: %s",
			sym.Name, site, sym.Name, off, cur, FentryNop, siteTaken(cur, site, t.Describe))
	}
	opt, resolve, err := codearea.LinkFor(k, sym.Name)
	if err != nil {
		return PlannedEdit{}, err
	}
	pl, err := area.Plan(obj, e.With, resolve, opt)
	if err != nil {
		return PlannedEdit{}, fmt.Errorf("object %s: %w", path, err)
	}
	pl.Site = site
	jump, err := codearea.JumpTo(site, pl.Image.Entry)
	if err != nil {
		return PlannedEdit{}, err
	}
	if rp.Writes, err = pl.Writes(); err != nil {
		return PlannedEdit{}, err
	}
	rp.Placement, rp.LinkMap = pl, &pl.Image.Map
	pe.New = jump
	pe.Before, _ = introspect.Disassemble(pe.Old, site)
	pe.After, err = introspect.Disassemble(pe.New, site)
	if err != nil || len(pe.After) != 1 || pe.After[0].Len != SiteLen {
		return PlannedEdit{}, fmt.Errorf("the jump % x at %#x does not decode as one instruction: %v", jump, site, err)
	}
	return pe, nil
}

// hvStoppedOf gives codearea the hypervisor view of a stopped guest.
func hvStoppedOf(sg StoppedGuest) hypervisor.StoppedGuest {
	switch s := sg.(type) {
	case hvStopped:
		return s.StoppedGuest
	case hvStoppedRIPs:
		return s.StoppedGuest
	}
	return stoppedAdapter{sg}
}

type stoppedAdapter struct{ StoppedGuest }

func (s stoppedAdapter) Resume() (hypervisor.FreezeReport, error) {
	r, err := s.StoppedGuest.Resume()
	return hypervisor.FreezeReport{Window: r.Window, Method: r.Method, VCPUs: r.VCPUs}, err
}

// hvWriterOf gives codearea the hypervisor view of a code writer.
func hvWriterOf(w CodeWriter) hypervisor.CodeWriter {
	if hw, ok := w.(hvWriter); ok {
		return hw.w
	}
	return writerAdapter{w}
}

type writerAdapter struct{ CodeWriter }

func (w writerAdapter) Stop(ctx context.Context) (hypervisor.StoppedGuest, error) {
	sg, err := w.CodeWriter.Stop(ctx)
	if err != nil {
		return nil, err
	}
	return hvStoppedOf(sg), nil
}

// registersDuringStop returns how to read the vCPU registers while the
// writer holds the guest stopped, or nil when that is not safe: the monitor
// may be called while the gdbstub or a libvirt suspend holds the VM, never
// under a ptrace freeze.
func registersDuringStop(w CodeWriter) func(context.Context) ([]hypervisor.CPUState, error) {
	hw, ok := w.(hvWriter)
	if !ok || hw.hv == nil {
		return nil
	}
	switch hw.w.Name() {
	case "gdbstub", "direct+suspend":
		return hw.hv.CPUs
	}
	return nil
}

// installReplacements puts the code of every replace edit into the area,
// inside the stop sg. On failure it undoes what it installed.
func installReplacements(sg StoppedGuest, pl *Plan) (undo func() error, err error) {
	hsg := hvStoppedOf(sg)
	var done []*ReplacePlan
	undo = func() error {
		var errs []error
		for i := len(done) - 1; i >= 0; i-- {
			ws := done[i].Writes
			for j := len(ws) - 1; j >= 0; j-- {
				if err := hsg.Write(ws[j].VA, ws[j].GPA, ws[j].Old); err != nil {
					errs = append(errs, fmt.Errorf("restoring %s at guest-physical %#x: %w", ws[j].What, ws[j].GPA, err))
				}
			}
		}
		return errors.Join(errs...)
	}
	for _, e := range pl.Edits {
		rp := e.Replace
		if rp == nil || e.Applied {
			continue
		}
		if err := rp.Area.InstallStopped(hsg, rp.Placement); err != nil {
			if uerr := undo(); uerr != nil {
				err = fmt.Errorf("%w; RESTORE FAILED: %w", err, uerr)
			}
			return nil, err
		}
		done = append(done, rp)
	}
	return undo, nil
}

// releaseReplaced releases the code-area entries of a reverted patch's
// replace edits, waiting (bounded) for them to fall out of use. The jumps
// must be gone already.
func releaseReplaced(ctx context.Context, d Domain, jp *JournalPatch) (waits int, err error) {
	var entries []string
	for _, je := range jp.Edits {
		if je.Kind == KindReplace && je.AreaEntry != "" {
			entries = append(entries, je.AreaEntry)
		}
	}
	if len(entries) == 0 {
		return 0, nil
	}
	kh, ok := d.Target.(KernelHolder)
	if !ok || kh.Kernel() == nil {
		return 0, fmt.Errorf("releasing the code area needs a live guest kernel")
	}
	area, err := codearea.Find(kh.Kernel())
	if err != nil {
		return 0, err
	}
	area.CPUs = registersDuringStop(d.Writer)
	w := hvWriterOf(d.Writer)
	for _, name := range entries {
		if _, placed := area.Entry(name); !placed {
			continue // released already
		}
		if err := area.ReleaseWait(ctx, w, name, ReleaseWait); err != nil {
			return area.Waits, err
		}
	}
	return area.Waits, nil
}

// areaEntries reads which entries the guest's code area holds (nil when
// the target has no kernel or no area).
func areaEntries(t Target) (map[string]codearea.Entry, error) {
	kh, ok := t.(KernelHolder)
	if !ok || kh.Kernel() == nil {
		return nil, fmt.Errorf("no live guest kernel to read the code area from")
	}
	area, err := codearea.Find(kh.Kernel())
	if err != nil {
		return nil, err
	}
	out := map[string]codearea.Entry{}
	for _, e := range area.Entries() {
		out[e.Name] = e
	}
	return out, nil
}
