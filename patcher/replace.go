package patcher

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
	"github.com/hvpatch/hvpatch/symbols"
)

// A replace edit redirects a kernel function to new code: the object is
// linked against the guest's symbols into the code area (codearea), and the
// function's fentry NOP becomes "jmp rel32" to the replacement. Edits of one
// patch naming the same object share one placement. The apply installs all
// the code and all the jumps in one freeze (code first); the revert removes
// the jumps in one freeze and releases the code in later ones, once no vCPU
// or kernel stack still uses it.

// KernelHolder is a Target backed by a guest kernel found by introspect;
// replace edits need it (the code area lives in the guest's page tables).
type KernelHolder interface {
	Kernel() *introspect.Kernel
}

// Kernel returns the introspected kernel.
func (t KernelTarget) Kernel() *introspect.Kernel { return t.K }

// ReplacePlan is the code-area side of a planned replace edit. The replace
// edits of a patch that name the same object share one code-area entry: one
// placement, linked once; each edit jumps to its own With symbol in it.
type ReplacePlan struct {
	Object string // the object file as read
	SHA256 string // hex SHA-256 of the bytes linked ("" when already applied)
	With   string // the replacement symbol
	// WithAddr is With's address in the linked image: the jump's target.
	WithAddr uint64
	// Entry names the code-area entry the jump leads into (EntryName).
	Entry string
	// Edits lists the edits (indexes into Patch.Edits) that share Entry,
	// this one included.
	Edits []int
	Area  *codearea.Area
	// Placement is the entry's placement, the same pointer on every edit
	// sharing it; nil when the edits are already applied.
	Placement *codearea.Placement
	// LinkMap is the link (sections, addresses, resolved relocations).
	LinkMap *linker.LinkMap
	// Writes is what installing the placement writes, in order (for the
	// rollback inside the freeze and for a dry run).
	Writes []codearea.PageWrite
}

// AreaEntryName is the code-area entry the edit uses ("" when unknown).
func (r *ReplacePlan) AreaEntryName() string {
	if r == nil {
		return ""
	}
	return r.Entry
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

// maxEntryName bounds code-area entry names (they are stored in the
// area's one-page header with every entry).
const maxEntryName = 96

var entryNameUnsafe = regexp.MustCompile(`[^A-Za-z0-9._+-]`)

// EntryName is the code-area entry of a patch's object: "<patch id>:<file
// name of the object>", shortened to a hash of the path when long.
func EntryName(patchID, object string) string {
	base := entryNameUnsafe.ReplaceAllString(filepath.Base(object), "_")
	name := patchID + ":" + base
	if len(name) > maxEntryName || base == "" || base == "." {
		sum := sha256.Sum256([]byte(object))
		name = patchID + ":" + hex.EncodeToString(sum[:6])
	}
	return name
}

// replaceSite is a replace edit's function and fentry site, read from the
// guest.
type replaceSite struct {
	index int
	edit  *Edit
	sym   Symbol
	off   uint64 // of the site from sym.Addr (4 after endbr64)
	site  uint64
	cur   []byte
}

// replaceGroup is the replace edits of one object.
type replaceGroup struct {
	path  string // as read (ObjectPath)
	name  string // the area entry
	sites []replaceSite
}

// planReplaces plans every replace edit of p (indexes idx) into out: the
// edits are grouped by object, each object linked once into one code-area
// entry, and each edit's jump aimed at its own With symbol. Nothing is
// written.
func planReplaces(t Target, p *Patch, idx []int, out []PlannedEdit) error {
	kh, ok := t.(KernelHolder)
	if !ok || kh.Kernel() == nil {
		return fmt.Errorf("edit %d: replace edits need a live guest kernel (its page tables hold the code area)", idx[0]+1)
	}
	k := kh.Kernel()
	var groups []*replaceGroup
	byPath := map[string]*replaceGroup{}
	for _, i := range idx {
		e := &p.Edits[i]
		rs, err := readReplaceSite(t, i, e)
		if err != nil {
			return fmt.Errorf("edit %d (%s): %w", i+1, e.String(), err)
		}
		path := filepath.Clean(p.ObjectPath(e))
		g := byPath[path]
		if g == nil {
			g = &replaceGroup{path: p.ObjectPath(e), name: EntryName(p.ID, e.Object)}
			byPath[path] = g
			groups = append(groups, g)
		}
		g.sites = append(g.sites, rs)
	}
	names := map[string]bool{}
	for _, g := range groups {
		if names[g.name] { // two objects with the same file name
			sum := sha256.Sum256([]byte(g.path))
			g.name = p.ID + ":" + hex.EncodeToString(sum[:6])
		}
		if names[g.name] {
			return fmt.Errorf("objects %s: two objects map to the code-area entry %s", g.path, g.name)
		}
		names[g.name] = true
	}
	area, err := codearea.Find(k)
	if err != nil {
		return err
	}
	for _, g := range groups {
		if err := planGroup(t, k, p, area, g, out); err != nil {
			return err
		}
	}
	return nil
}

func readReplaceSite(t Target, i int, e *Edit) (replaceSite, error) {
	sym, err := symbolOf(t, e)
	if err != nil {
		return replaceSite{}, err
	}
	head := make([]byte, len(Endbr64)+SiteLen)
	if err := t.ReadVirt(sym.Addr, head); err != nil {
		return replaceSite{}, fmt.Errorf("reading the entry of %s at %#x: %w", sym.Name, sym.Addr, err)
	}
	off := uint64(0)
	if bytes.HasPrefix(head, Endbr64) {
		off = uint64(len(Endbr64))
	}
	return replaceSite{index: i, edit: e, sym: sym, off: off, site: sym.Addr + off,
		cur: append([]byte(nil), head[off:off+SiteLen]...)}, nil
}

func (g *replaceGroup) editList() string {
	var parts []string
	for _, s := range g.sites {
		parts = append(parts, fmt.Sprint(s.index+1))
	}
	return strings.Join(parts, ", ")
}

// planGroup plans the edits of one object: already applied (every site
// jumps into its placed entry), or one new placement and a jump per edit.
func planGroup(t Target, k *introspect.Kernel, p *Patch, area *codearea.Area, g *replaceGroup, out []PlannedEdit) error {
	var edits []int
	for _, s := range g.sites {
		edits = append(edits, s.index)
	}
	newEdit := func(s replaceSite, rp *ReplacePlan) PlannedEdit {
		return PlannedEdit{Kind: KindReplace, Symbol: s.sym.Name, SymbolAddr: s.sym.Addr, SymbolSize: s.sym.Size, Offset: s.off, VA: s.site,
			Old: append([]byte(nil), s.cur...), Replace: rp}
	}
	name := g.name
	ent, placed := area.Entry(name)
	if !placed && len(g.sites) == 1 {
		// hvpatch before shared entries named the entry after the
		// replacement symbol; such a patch still counts as applied.
		if old, ok := area.Entry(g.sites[0].edit.With); ok && old.Site == g.sites[0].site {
			name, ent, placed = g.sites[0].edit.With, old, true
		}
	}
	if placed {
		lo := area.TextVA(ent.TextPage)
		for _, s := range g.sites {
			to, isJump := codearea.JumpTarget(s.site, s.cur)
			if !isJump || to < lo || to >= lo+ent.TextSize {
				return fmt.Errorf("edit %d (%s): the code-area entry %s is placed already (text %#x..%#x) but %s's site %#x holds % x: a half-done replace; revert or reconcile first",
					s.index+1, s.edit.String(), name, lo, lo+ent.TextSize, s.sym.Name, s.site, s.cur)
			}
			rp := &ReplacePlan{Object: g.path, With: s.edit.With, WithAddr: to, Entry: name, Edits: edits, Area: area}
			pe := newEdit(s, rp)
			pe.Old = guestFentryNop(t) // the site holds the jump: the guest's own NOP form
			pe.New, pe.Applied = append([]byte(nil), s.cur...), true
			pe.Before, _ = introspect.Disassemble(pe.Old, s.site)
			pe.After, _ = introspect.Disassemble(pe.New, s.site)
			out[s.index] = pe
		}
		return nil
	}
	for _, s := range g.sites {
		if !IsFentryNop(s.cur) {
			return fmt.Errorf("edit %d (%s): the fentry site of %s at %#x (%s+%#x) is not free: found % x, want a 5-byte NOP (% x): %s",
				s.index+1, s.edit.String(), s.sym.Name, s.site, s.sym.Name, s.off, s.cur, codearea.FentryNops, siteTaken(s.cur, s.site, t.Describe))
		}
	}
	what := fmt.Sprintf("object %s (edit %s)", g.path, g.editList())
	data, err := os.ReadFile(g.path)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	sum := sha256.Sum256(data)
	found := hex.EncodeToString(sum[:])
	if p.Objects != nil {
		want, listed := p.Objects[g.sites[0].edit.Object]
		if !listed {
			return fmt.Errorf("%s: not listed in the patch's objects", what)
		}
		if found != strings.ToLower(want) {
			return fmt.Errorf("%s: SHA-256 mismatch: the patch file records %s, the file holds %s; refusing to link it", what, strings.ToLower(want), found)
		}
	}
	obj, err := linker.LoadBytes(data)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	first := g.sites[0]
	for _, s := range g.sites[1:] {
		if s.edit.Module != first.edit.Module {
			return fmt.Errorf("%s: its edits are in %s and %s: one object links against one module's symbols (or the kernel image's); split it",
				what, moduleText(first.edit.Module), moduleText(s.edit.Module))
		}
	}
	opt, resolve, err := linkForSite(k, first)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	pl, err := area.PlanNamed(obj, name, first.edit.With, resolve, opt)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	pl.Site = first.site
	writes, err := pl.Writes()
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	for _, s := range g.sites {
		to, err := entrySymbol(pl.Image, s.edit.With)
		if err != nil {
			return fmt.Errorf("edit %d (%s): object %s: %w", s.index+1, s.edit.String(), g.path, err)
		}
		jump, err := codearea.JumpTo(s.site, to)
		if err != nil {
			return fmt.Errorf("edit %d (%s): %w", s.index+1, s.edit.String(), err)
		}
		rp := &ReplacePlan{Object: g.path, SHA256: found, With: s.edit.With, WithAddr: to, Entry: name, Edits: edits,
			Area: area, Placement: pl, LinkMap: &pl.Image.Map, Writes: writes}
		pe := newEdit(s, rp)
		pe.New = jump
		pe.Before, _ = introspect.Disassemble(pe.Old, s.site)
		pe.After, err = introspect.Disassemble(pe.New, s.site)
		if err != nil || len(pe.After) != 1 || pe.After[0].Len != SiteLen {
			return fmt.Errorf("edit %d: the jump % x at %#x does not decode as one instruction: %v", s.index+1, jump, s.site, err)
		}
		out[s.index] = pe
	}
	return nil
}

// linkForSite is the link of a replacement for the site's function: the
// kernel image's (codearea.LinkForSymbol), or for a function of a loaded
// module that module's (codearea.LinkForModuleSymbol: its own symbols
// first, statics as "NAME,N" in its table, then the kernel's).
func linkForSite(k *introspect.Kernel, s replaceSite) (linker.Options, linker.Resolver, error) {
	sym := symbols.Symbol{Name: s.sym.Name, Addr: s.sym.Addr}
	if s.edit.Module == "" {
		return codearea.LinkForSymbol(k, sym)
	}
	mods, err := k.ModuleSymbols()
	if err != nil {
		return linker.Options{}, nil, fmt.Errorf("module %s: %w", s.edit.Module, err)
	}
	return codearea.LinkForModuleSymbol(k, mods, s.edit.Module, sym)
}

func moduleText(m string) string {
	if m == "" {
		return "the kernel image"
	}
	return "module " + m
}

// entrySymbol finds a replacement function in a linked image: a symbol of
// that name the object defines in a text section (a global one when there
// are several).
func entrySymbol(img *linker.Image, name string) (uint64, error) {
	text := map[string]bool{}
	for _, sec := range img.Map.Sections {
		if sec.Area == "text" {
			text[sec.Name] = true
		}
	}
	var found []linker.DefinedSymbol
	for _, s := range img.Map.Symbols {
		if s.Name == name {
			found = append(found, s)
		}
	}
	if len(found) == 0 {
		return 0, fmt.Errorf("the replacement function %s (with:) is not defined in the object", name)
	}
	var pick []linker.DefinedSymbol
	for _, s := range found {
		if s.Global {
			pick = []linker.DefinedSymbol{s}
			break
		}
		pick = append(pick, s)
	}
	if len(pick) > 1 {
		return 0, fmt.Errorf("the replacement function %s (with:) is ambiguous in the object: %d local definitions", name, len(pick))
	}
	if !text[pick[0].Section] {
		return 0, fmt.Errorf("%s (with:) is defined in section %s, not in code", name, pick[0].Section)
	}
	return pick[0].Addr, nil
}

// installReplacements puts the code of every replace edit into the area,
// inside the stop sg. On failure it undoes what it installed.
func installReplacements(sg StoppedGuest, pl *Plan) (undo func() error, err error) {
	var done []*ReplacePlan
	undo = func() error {
		var errs []error
		for i := len(done) - 1; i >= 0; i-- {
			ws := done[i].Writes
			for j := len(ws) - 1; j >= 0; j-- {
				if err := sg.Write(ws[j].VA, ws[j].GPA, ws[j].Old); err != nil {
					errs = append(errs, fmt.Errorf("restoring %s at guest-physical %#x: %w", ws[j].What, ws[j].GPA, err))
				}
			}
		}
		return errors.Join(errs...)
	}
	installed := map[*codearea.Placement]bool{}
	for _, e := range pl.Edits {
		rp := e.Replace
		if rp == nil || e.Applied || rp.Placement == nil || installed[rp.Placement] {
			continue // applied, or an entry shared with an earlier edit
		}
		installed[rp.Placement] = true
		if err := rp.Area.InstallStopped(sg, rp.Placement); err != nil {
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
	// Each entry once, however many edits share it.
	var entries []string
	sites := map[string][]JournalEdit{}
	for _, je := range jp.Edits {
		if je.Kind == KindReplace && je.AreaEntry != "" {
			if sites[je.AreaEntry] == nil {
				entries = append(entries, je.AreaEntry)
			}
			sites[je.AreaEntry] = append(sites[je.AreaEntry], je)
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
	for _, name := range entries {
		ent, placed := area.Entry(name)
		if !placed {
			continue // released already
		}
		// The area records one jump site per entry; a shared entry has
		// one per edit, and every one must be gone.
		lo := area.TextVA(ent.TextPage)
		for _, je := range sites[name] {
			cur := make([]byte, SiteLen)
			if err := d.Target.ReadVirt(je.VA, cur); err != nil {
				return area.Waits, fmt.Errorf("reading the site of %s at %#x: %w", je.Symbol, je.VA, err)
			}
			if to, ok := codearea.JumpTarget(je.VA, cur); ok && to >= lo && to < lo+ent.TextSize {
				return area.Waits, fmt.Errorf("%s at %#x still jumps into %s (%#x): not releasing it", je.Symbol, je.VA, name, to)
			}
		}
		if err := area.ReleaseWait(ctx, d.Writer, name, ReleaseWait); err != nil {
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

// releaseGoneModule releases the code-area entries of a patch whose
// module is gone (StateModuleGone): its module sites are no longer code
// (or are fresh code that never jumps there), so only the entry's use by
// a vCPU or a kernel stack is checked, by the area's release, waiting
// (bounded) for it to end. An entry a kernel-image edit of the patch
// still jumps into is kept. It returns the entries released.
func releaseGoneModule(ctx context.Context, d Domain, jp *JournalPatch) (released []string, waits int, err error) {
	var entries []string
	kernelSites := map[string][]JournalEdit{}
	seen := map[string]bool{}
	for _, je := range jp.Edits {
		if je.Kind != KindReplace || je.AreaEntry == "" {
			continue
		}
		if !seen[je.AreaEntry] {
			seen[je.AreaEntry] = true
			entries = append(entries, je.AreaEntry)
		}
		if je.Module == "" {
			kernelSites[je.AreaEntry] = append(kernelSites[je.AreaEntry], je)
		}
	}
	if len(entries) == 0 {
		return nil, 0, nil
	}
	kh, ok := d.Target.(KernelHolder)
	if !ok || kh.Kernel() == nil {
		return nil, 0, fmt.Errorf("releasing the code area needs a live guest kernel")
	}
	area, err := codearea.Find(kh.Kernel())
	if err != nil {
		return nil, 0, err
	}
	for _, name := range entries {
		if _, placed := area.Entry(name); !placed || len(kernelSites[name]) > 0 {
			continue // released already, or still the target of a kernel site
		}
		if err := area.ReleaseWait(ctx, d.Writer, name, ReleaseWait); err != nil {
			return released, area.Waits, fmt.Errorf("releasing %s: %w", name, err)
		}
		released = append(released, name)
	}
	return released, area.Waits, nil
}

// goneEntriesPlaced reports whether a module-gone patch still has
// code-area entries to release (false when the area cannot be read).
func goneEntriesPlaced(t Target, jp *JournalPatch) bool {
	if !hasReplace(jp) {
		return false
	}
	ents, err := areaEntries(t)
	if err != nil {
		return false
	}
	for _, je := range jp.Edits {
		if _, placed := ents[je.AreaEntry]; placed && je.Kind == KindReplace && je.Module != "" {
			return true
		}
	}
	return false
}
