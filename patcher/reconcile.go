package patcher

import (
	"fmt"
	"strings"
)

// Memory states of a journaled patch, as read from the guest.
const (
	MemApplied    = "applied"     // every edit holds its new bytes
	MemNotApplied = "not applied" // every edit holds its original bytes
	MemMixed      = "mixed"       // some edits new, some original
	MemUnknown    = "unknown bytes"
	MemRebooted   = "gone (guest rebooted)"
	// MemSuperseded: a cumulative patch holds the patch's functions now.
	MemSuperseded = "superseded"
	// MemModuleGone: the module the patch was in is no longer loaded (or
	// was loaded again with fresh code); see StateModuleGone.
	MemModuleGone = "module gone"
)

// PatchStatus is one journaled patch compared with guest memory.
type PatchStatus struct {
	Entry   JournalPatch
	Memory  string   // one of the Mem* states
	Details []string // per-edit findings when not simply applied
	// Difference says what did not match the journal, "" when nothing.
	Difference string
}

// Status is a domain's journal reconciled with its memory.
type Status struct {
	Domain, UUID string
	Release      string
	BootID       string
	Patches      []PatchStatus
	// Changed is set when the journal was rewritten to match memory.
	Changed bool
}

// Reconcile compares the domain's journal with what guest memory holds,
// reports every difference and rewrites the journal to match the guest:
// entries of an earlier boot and patches no longer in memory are dropped,
// a pending apply found complete becomes applied. Entries with bytes that
// are neither original nor patched are kept and reported.
func (pt *Patcher) Reconcile(d Domain) (*Status, error) {
	lock, _, st, err := pt.begin(d)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	return st, nil
}

// Differences lists the patches whose journal entry did not match memory.
func (st *Status) Differences() []PatchStatus {
	var out []PatchStatus
	for _, ps := range st.Patches {
		if ps.Difference != "" {
			out = append(out, ps)
		}
	}
	return out
}

// reconcile does Reconcile's work with the lock held and j loaded; j is
// updated in place.
func (pt *Patcher) reconcile(d Domain, j *Journal) (*Status, error) {
	bootID, err := BootIdentity(d.Target)
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	st := &Status{Domain: d.Name, UUID: d.UUID, Release: d.Target.Release(), BootID: bootID}
	var keep []JournalPatch
	var mods *moduleList // read when a journaled edit is in a module
	for _, jp := range j.Patches {
		ps := PatchStatus{Entry: jp}
		if jp.BootID != bootID {
			ps.Memory = MemRebooted
			kernel := ""
			if jp.Release != st.Release {
				kernel = fmt.Sprintf(", kernel %s then, %s now", jp.Release, st.Release)
			}
			ps.Difference = fmt.Sprintf("journal says %s, but the guest has rebooted since (boot identity changed%s): the patch is gone", jp.State, kernel)
			st.Patches = append(st.Patches, ps)
			st.Changed = true
			continue
		}
		if jp.SupersededBy != "" {
			// Its sites belong to the superseding patch; what is left of
			// it is code waiting for release (state releasing).
			ps.Memory = MemSuperseded
			if j.Find(jp.SupersededBy) == nil {
				ps.Difference = fmt.Sprintf("superseded by %s, which is no longer in the journal: removed", jp.SupersededBy)
				st.Changed = true
				st.Patches = append(st.Patches, ps)
				continue
			}
			if jp.State == StateReleasing {
				if ents, err := areaEntries(d.Target); err == nil {
					left := false
					for _, je := range jp.Edits {
						_, placed := ents[je.AreaEntry]
						left = left || je.Kind == KindReplace && placed
					}
					if !left {
						jp.State, st.Changed = StateSuperseded, true
					}
				}
			}
			ps.Entry = jp
			keep = append(keep, jp)
			st.Patches = append(st.Patches, ps)
			continue
		}
		if jp.State == StateModuleGone {
			ps.Memory = MemModuleGone
			ps.Entry = jp
			keep = append(keep, jp)
			st.Patches = append(st.Patches, ps)
			continue
		}
		if why := moduleGone(d.Target, jp, &mods); why != "" {
			ps.Memory = MemModuleGone
			ps.Difference = fmt.Sprintf("journal says %s, but %s: the patch went with it (state %s)", jp.State, why, StateModuleGone)
			jp.State, st.Changed = StateModuleGone, true
			ps.Entry = jp
			keep = append(keep, jp)
			st.Patches = append(st.Patches, ps)
			continue
		}
		ps.Memory, ps.Details = memoryState(d.Target, jp)
		switch {
		case ps.Memory == MemApplied && jp.State != StateApplied:
			ps.Difference = fmt.Sprintf("journal says %s, memory holds the patch: recorded as applied", jp.State)
			jp.State = StateApplied
			st.Changed = true
		case ps.Memory == MemNotApplied && jp.State == StateApplied:
			ps.Difference = "journal says applied, memory holds the original bytes (reverted outside hvpatch?): removed from the journal"
			st.Changed = true
		case ps.Memory == MemNotApplied:
			ps.Difference = fmt.Sprintf("journal says %s, memory holds the original bytes: removed from the journal", jp.State)
			st.Changed = true
		case ps.Memory == MemMixed || ps.Memory == MemUnknown:
			ps.Difference = fmt.Sprintf("journal says %s, memory holds %s: %s", jp.State, ps.Memory, strings.Join(ps.Details, "; "))
		}
		ps.Entry = jp
		if ps.Memory != MemNotApplied {
			keep = append(keep, jp)
		}
		st.Patches = append(st.Patches, ps)
	}
	if st.Changed {
		j.Patches = keep
		if err := pt.State.Save(j); err != nil {
			return st, err
		}
	}
	return st, nil
}

func memoryState(t Target, jp JournalPatch) (string, []string) {
	var nNew, nOld int
	var details []string
	var entries map[string]bool // code-area entries, read when needed
	for _, je := range jp.Edits {
		cur := make([]byte, len(je.New))
		if err := t.ReadVirt(je.VA, cur); err != nil {
			details = append(details, fmt.Sprintf("%s+%#x: %v", je.Symbol, je.Offset, err))
			continue
		}
		if je.Kind == KindReplace {
			ok, detail := replaceState(t, je, cur, &entries)
			switch {
			case detail != "":
				details = append(details, detail)
			case ok:
				nNew++
			default:
				nOld++
				details = append(details, fmt.Sprintf("%s+%#x holds the original % x and the code area no entry %s", je.Symbol, je.Offset, cur, je.AreaEntry))
			}
			continue
		}
		switch string(cur) {
		case string(je.New):
			nNew++
		case string(je.Old):
			nOld++
			details = append(details, fmt.Sprintf("%s+%#x holds the original % x", je.Symbol, je.Offset, cur))
		default:
			details = append(details, fmt.Sprintf("%s+%#x holds % x (original % x, patched % x)", je.Symbol, je.Offset, cur, []byte(je.Old), []byte(je.New)))
		}
	}
	switch {
	case nNew == len(jp.Edits):
		return MemApplied, nil
	case nOld == len(jp.Edits):
		return MemNotApplied, details
	case nNew+nOld == len(jp.Edits):
		return MemMixed, details
	}
	return MemUnknown, details
}

// replaceState judges a replace edit: the jump and the code-area entry go
// together. applied is true when both are there, false when neither is;
// detail describes any other state (one without the other, foreign bytes).
func replaceState(t Target, je JournalEdit, cur []byte, entries *map[string]bool) (applied bool, detail string) {
	if *entries == nil {
		m := map[string]bool{}
		ents, err := areaEntries(t)
		if err != nil {
			return false, fmt.Sprintf("%s: cannot read the code area: %v", je.Symbol, err)
		}
		for name := range ents {
			m[name] = true
		}
		*entries = m
	}
	placed := (*entries)[je.AreaEntry]
	switch string(cur) {
	case string(je.New):
		if placed {
			return true, ""
		}
		return false, fmt.Sprintf("%s+%#x jumps (% x) but the code area has no entry %s: the jump leads to released code", je.Symbol, je.Offset, cur, je.AreaEntry)
	case string(je.Old):
		if placed {
			return false, fmt.Sprintf("%s+%#x holds the original % x but the code area still holds %s (its release is pending: revert again)", je.Symbol, je.Offset, cur, je.AreaEntry)
		}
		return false, ""
	}
	return false, fmt.Sprintf("%s+%#x holds % x (original % x, patched % x)", je.Symbol, je.Offset, cur, []byte(je.Old), []byte(je.New))
}

// moduleList is the guest's module list, read once per reconcile.
type moduleList struct {
	byName map[string]LoadedModule
	err    error
}

// moduleGone says why the module a journaled patch's edits are in is gone
// ("" when it is not, or nothing says so): no longer in the module list,
// loaded again at another base, or at the same base with the original
// bytes back at a site (a fresh copy of its code, or a revert outside
// hvpatch: either way nothing of the patch is there). A module list that
// cannot be read proves nothing.
func moduleGone(t Target, jp JournalPatch, mods **moduleList) string {
	if jp.State != StateApplied {
		return ""
	}
	for _, je := range jp.Edits {
		if je.Module == "" {
			continue
		}
		if *mods == nil {
			ml := &moduleList{byName: map[string]LoadedModule{}}
			if l, ok := t.(ModuleLister); !ok {
				ml.err = fmt.Errorf("this target cannot list modules")
			} else if all, err := l.LoadedModules(); err != nil {
				ml.err = err
			} else {
				for _, m := range all {
					ml.byName[m.Name] = m
				}
			}
			*mods = ml
		}
		if (*mods).err != nil {
			return ""
		}
		m, ok := (*mods).byName[je.Module]
		switch {
		case !ok:
			return fmt.Sprintf("module %s was unloaded", je.Module)
		case je.ModuleBase != 0 && m.Base != je.ModuleBase:
			return fmt.Sprintf("module %s was unloaded and loaded again (text at %#x, patched at %#x)", je.Module, m.Base, je.ModuleBase)
		}
		cur := make([]byte, len(je.Old))
		if err := t.ReadVirt(je.VA, cur); err == nil && string(cur) == string(je.Old) && string(je.Old) != string(je.New) {
			return fmt.Sprintf("module %s holds its original code at %s+%#x (loaded again at the same address, or reverted outside hvpatch)", je.Module, je.Symbol, je.Offset)
		}
	}
	return ""
}
