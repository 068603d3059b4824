package patcher

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/hvpatch/hvpatch/introspect"
)

// Cumulative patches. A patch that lists applied patches in replaces:
// supersedes them in its apply's one stop: where its edits cover theirs
// (the same function's fentry site, the same bytes), its new bytes are
// written over theirs; their edits it does not cover are put back to the
// original bytes in that stop. Their replacement code is released from the
// code area afterwards, once no vCPU or stack uses it, like a revert's. The
// journal keeps them, state "superseded" (or "releasing" while their code
// waits for release) and superseded_by naming the new patch, until that
// patch is reverted: a revert of the new patch restores the original
// functions, not the superseded patches.
//
// A patch that edits a function another applied patch already changed,
// without listing it in replaces:, is refused naming the owner.

// originalView is a Target reading the original bytes at the sites of the
// superseded patches' edits, so that the new patch plans against the
// kernel as it was before them.
type originalView struct {
	Target
	over map[uint64]byte
}

func newOriginalView(t Target, sup []JournalPatch) Target {
	v := &originalView{Target: t, over: map[uint64]byte{}}
	for _, jp := range sup {
		for _, je := range jp.Edits {
			for i, b := range je.Old {
				v.over[je.VA+uint64(i)] = b
			}
		}
	}
	return v
}

func (v *originalView) ReadVirt(va uint64, p []byte) error {
	if err := v.Target.ReadVirt(va, p); err != nil {
		return err
	}
	for i := range p {
		if b, ok := v.over[va+uint64(i)]; ok {
			p[i] = b
		}
	}
	return nil
}

// LoadedModules forwards to the wrapped target's module list.
func (v *originalView) LoadedModules() ([]LoadedModule, error) {
	ml, ok := v.Target.(ModuleLister)
	if !ok {
		return nil, fmt.Errorf("this target cannot list modules")
	}
	return ml.LoadedModules()
}

// ModuleSymbols forwards to the wrapped target's module symbols.
func (v *originalView) ModuleSymbols(module, name string) ([]Symbol, error) {
	mt, ok := v.Target.(ModuleTarget)
	if !ok {
		return nil, fmt.Errorf("module %s: this target cannot read module symbols", module)
	}
	return mt.ModuleSymbols(module, name)
}

// Kernel forwards the live kernel of a wrapped KernelHolder (nil if none).
func (v *originalView) Kernel() *introspect.Kernel {
	if kh, ok := v.Target.(KernelHolder); ok {
		return kh.Kernel()
	}
	return nil
}

// planSupersede sets Prev on the edits of pl that overwrite a superseded
// edit and plans the undo of those it does not cover. t reads real memory.
func planSupersede(t Target, pl *Plan, sup []JournalPatch) error {
	pl.Supersedes = append([]JournalPatch(nil), sup...)
	for _, jp := range sup {
		for _, je := range jp.Edits {
			cur := make([]byte, len(je.New))
			if err := t.ReadVirt(je.VA, cur); err != nil {
				return fmt.Errorf("superseding %s: reading %s+%#x: %w", jp.ID, je.Symbol, je.Offset, err)
			}
			if !bytes.Equal(cur, je.New) {
				return fmt.Errorf("superseding %s: %s+%#x (%#x) holds % x, not its patched bytes % x; reconcile first (hvpatch status)",
					jp.ID, je.Symbol, je.Offset, je.VA, cur, []byte(je.New))
			}
			covered := false
			for i := range pl.Edits {
				e := &pl.Edits[i]
				end, jend := e.VA+uint64(len(e.Old)), je.VA+uint64(len(je.New))
				if e.VA >= jend || je.VA >= end {
					continue
				}
				if e.VA != je.VA || len(e.Old) != len(je.Old) || !bytes.Equal(e.Old, je.Old) {
					return fmt.Errorf("edit %d (%s+%#x, %d bytes) overlaps %s's edit at %s+%#x (%d bytes) without covering it exactly: a cumulative patch must change the same sites",
						e.Index+1, e.Symbol, e.Offset, len(e.Old), jp.ID, je.Symbol, je.Offset, len(je.Old))
				}
				e.Prev, e.PrevPatch, e.Applied = append([]byte(nil), cur...), jp.ID, false
				covered = true
			}
			if !covered {
				pl.Undo = append(pl.Undo, PlannedEdit{Kind: je.Kind, Symbol: je.Symbol, Offset: je.Offset, VA: je.VA,
					Old: je.New, New: je.Old, Chunks: reverseChunks(je.Chunks), PrevPatch: jp.ID})
			}
		}
	}
	return nil
}

// supersedeList is what p supersedes on this boot: the applied patches it
// lists in replaces:. Listed patches not applied are skipped; one in a
// state that needs attention is refused.
func supersedeList(j *Journal, p *Patch, bootID string) ([]JournalPatch, error) {
	var out []JournalPatch
	for _, id := range p.Replaces {
		jp := j.Find(id)
		if jp == nil || jp.BootID != bootID || jp.SupersededBy != "" {
			continue
		}
		switch jp.State {
		case StateApplied:
			out = append(out, *jp)
		case StateReleasing, StateModuleGone:
			// Its jumps are gone; its code is released by a revert.
		default:
			return nil, fmt.Errorf("patch %s replaces %s, which is in state %s; it needs attention first (hvpatch status)", p.ID, id, jp.State)
		}
	}
	return out, nil
}

// checkOwners refuses a patch that edits a function another applied patch
// changed, unless it supersedes that patch: the function belongs to one
// patch at a time. A replace edit owns its whole function; other edits
// conflict where their bytes overlap.
func checkOwners(t Target, j *Journal, p *Patch, bootID string) error {
	for i := range p.Edits {
		e := &p.Edits[i]
		sym, err := symbolOf(t, e)
		if err != nil {
			continue // MakePlan reports it
		}
		lo, hi := sym.Addr, sym.Addr+max(sym.Size, 1)
		for _, jp := range j.Patches {
			if jp.ID == p.ID || jp.BootID != bootID || jp.SupersededBy != "" || jp.State == StateReleasing || jp.State == StateModuleGone || p.Supersedes(jp.ID) {
				continue
			}
			for _, je := range jp.Edits {
				if je.VA < lo || je.VA >= hi {
					continue
				}
				if e.Kind != KindReplace && je.Kind != KindReplace && !editOverlaps(t, e, sym, je) {
					continue
				}
				return fmt.Errorf("patch %s changes %s, which patch %s (%s, %s) already patched: a function belongs to one patch at a time. "+
					"Ship the fix as a cumulative patch that lists it (replaces: [%s]), or revert %s first",
					p.ID, sym.Name, jp.ID, jp.State, je.Kind+" edit", jp.ID, jp.ID)
			}
		}
	}
	return nil
}

// editOverlaps reports whether e's bytes (as far as known before planning)
// overlap the journaled edit je.
func editOverlaps(t Target, e *Edit, sym Symbol, je JournalEdit) bool {
	var from, n uint64
	switch e.Kind {
	case KindBytes:
		from, n = sym.Addr+*e.Offset, uint64(len(e.Expect))
	default: // return: the fentry site, after endbr64 when there is one
		from, n = sym.Addr, uint64(len(Endbr64)+SiteLen)
	}
	return from < je.VA+uint64(len(je.New)) && je.VA < from+n
}

// superseded names what a plan superseded, for messages.
func (pl *Plan) supersededText() string {
	var ids []string
	for _, jp := range pl.Supersedes {
		ids = append(ids, jp.ID)
	}
	return strings.Join(ids, ", ")
}
