package patcher

import (
	"bytes"
	"fmt"
	"path"
	"strings"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/introspect"
)

// Plan is everything an apply will do, worked out and verified against
// guest memory before anything is frozen or written.
type Plan struct {
	Patch   *Patch
	Release string
	BuildID string // "" when the kernel exposes none
	BootID  string
	Edits   []PlannedEdit
	// Supersedes are the applied patches this one replaces (replaces:),
	// swapped out in the apply's stop; Undo are their edits that no edit
	// of this patch covers, put back to the original bytes in that stop.
	Supersedes []JournalPatch
	Undo       []PlannedEdit
}

// PlannedEdit is one edit resolved to addresses and bytes.
type PlannedEdit struct {
	Index      int // position in Patch.Edits
	Kind       string
	Symbol     string
	SymbolAddr uint64
	SymbolSize uint64 // the function's size (kallsyms), 0 when unknown
	Offset     uint64 // of the first changed byte from SymbolAddr
	VA         uint64
	Old, New   []byte
	Chunks     []Chunk // the range split at page boundaries
	// RIPCheck is set for edits that do not replace exactly one whole
	// instruction: they need every vCPU's RIP outside [CheckStart, CheckEnd).
	RIPCheck             bool
	CheckStart, CheckEnd uint64
	// Applied is set when memory already holds New.
	Applied bool
	// Before and After are the instructions over the edited range, before
	// and after the edit.
	Before, After []introspect.Inst
	// Replace is the code-area side of a replace edit (nil for others).
	Replace *ReplacePlan
	// Prev is set when memory holds a superseded patch's bytes (PrevPatch)
	// over this edit's range instead of Old: the apply checks and
	// overwrites Prev; Old stays the original a revert puts back.
	Prev      []byte
	PrevPatch string
	// Module is the loaded module the edit is in ("" for the kernel
	// image) and ModuleBase that module's text base when planned: a
	// later module list without it, or with another base, means the
	// module was unloaded (reconcile: MemModuleGone).
	Module     string
	ModuleBase uint64
}

// stopChunks are the chunks the apply's stop checks and writes: Chunks,
// with Prev as the bytes expected when the edit supersedes another.
func (e *PlannedEdit) stopChunks() []Chunk {
	if e.Prev == nil {
		return e.Chunks
	}
	out := make([]Chunk, len(e.Chunks))
	for i, c := range e.Chunks {
		off := c.VA - e.VA
		out[i] = Chunk{VA: c.VA, GPA: c.GPA, Old: e.Prev[off : off+uint64(len(c.Old))], New: c.New}
	}
	return out
}

// Chunk is a part of an edit within one guest page, so that writers
// addressing guest-physical memory get a contiguous range.
type Chunk struct {
	VA, GPA  uint64
	Old, New []byte
}

// PlanOptions change what the planner accepts.
type PlanOptions struct {
	// RIPChecked accepts bytes edits that do not replace exactly one whole
	// instruction; the apply then checks every vCPU's RIP with the VM
	// stopped through the monitor.
	RIPChecked bool
	// Supersede are the applied patches the patch replaces (replaces:),
	// as the journal has them: their edits' sites are planned as if they
	// held the original bytes, and the plan overwrites or undoes them in
	// the same stop. Patcher.Plan and Apply fill it from the journal.
	Supersede []JournalPatch
}

// AlreadyApplied reports whether memory already holds every edit.
func (p *Plan) AlreadyApplied() bool {
	for _, e := range p.Edits {
		if !e.Applied {
			return false
		}
	}
	return len(p.Edits) > 0
}

// NeedsRIPCheck reports whether some edit needs the RIP-checked mode.
func (p *Plan) NeedsRIPCheck() bool {
	for _, e := range p.Edits {
		if e.RIPCheck && !e.Applied {
			return true
		}
	}
	return false
}

// MakePlan resolves and verifies a patch against a guest kernel. It reads
// guest memory and never writes it. Any edit that cannot be planned fails
// the whole patch.
func MakePlan(t Target, p *Patch, opt PlanOptions) (*Plan, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	pl := &Plan{Patch: p, Release: t.Release()}
	var err error
	if pl.BuildID, err = BuildID(t); err != nil {
		return nil, err
	}
	if err := matchKernel(p, pl.Release, pl.BuildID); err != nil {
		return nil, err
	}
	if pl.BootID, err = BootIdentity(t); err != nil {
		return nil, err
	}
	real := t
	if len(opt.Supersede) > 0 {
		t = newOriginalView(t, opt.Supersede)
	}
	planned := make([]PlannedEdit, len(p.Edits))
	var replaces []int
	for i := range p.Edits {
		var pe PlannedEdit
		switch e := &p.Edits[i]; e.Kind {
		case KindReturn:
			pe, err = planReturn(t, e)
		case KindBytes:
			pe, err = planBytes(t, e, opt)
		case KindReplace:
			replaces = append(replaces, i) // planned together, below
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("patch %s: edit %d (%s): %w", p.ID, i+1, p.Edits[i].String(), err)
		}
		planned[i] = pe
	}
	if len(replaces) > 0 {
		if err := planReplaces(t, p, replaces, planned); err != nil {
			return nil, fmt.Errorf("patch %s: %w", p.ID, err)
		}
	}
	for i, pe := range planned {
		pe.Index = i
		if mod := p.Edits[i].Module; mod != "" {
			pe.Module = mod
			if m, ok, err := loadedModule(real, mod); err == nil && ok {
				pe.ModuleBase = m.Base
			}
		}
		if pe.Chunks, err = chunks(t, pe.VA, pe.Old, pe.New); err != nil {
			return nil, fmt.Errorf("patch %s: edit %d: %w", p.ID, i+1, err)
		}
		pl.Edits = append(pl.Edits, pe)
	}
	for i := range pl.Edits {
		for j := i + 1; j < len(pl.Edits); j++ {
			a, b := pl.Edits[i], pl.Edits[j]
			if a.VA < b.VA+uint64(len(b.New)) && b.VA < a.VA+uint64(len(a.New)) {
				return nil, fmt.Errorf("patch %s: edits %d and %d overlap at %#x", p.ID, a.Index+1, b.Index+1, max(a.VA, b.VA))
			}
		}
	}
	if len(opt.Supersede) > 0 {
		if err := planSupersede(real, pl, opt.Supersede); err != nil {
			return nil, fmt.Errorf("patch %s: %w", p.ID, err)
		}
	}
	return pl, nil
}

// matchKernel checks the patch's match section against the guest kernel.
func matchKernel(p *Patch, release, buildID string) error {
	if len(p.Match.Release) > 0 {
		ok := false
		for _, g := range p.Match.Release {
			if m, _ := path.Match(g, release); m {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Errorf("patch %s is for kernel release %s, the guest runs %s", p.ID, strings.Join(p.Match.Release, " or "), release)
		}
	}
	if len(p.Match.BuildIDs) > 0 {
		if buildID == "" {
			return fmt.Errorf("patch %s requires build id %s, the guest kernel %s exposes none", p.ID, strings.Join(p.Match.BuildIDs, " or "), release)
		}
		ok := false
		for _, id := range p.Match.BuildIDs {
			ok = ok || id == buildID
		}
		if !ok {
			return fmt.Errorf("patch %s is for kernel build id %s, the guest kernel %s has %s", p.ID, strings.Join(p.Match.BuildIDs, " or "), release, buildID)
		}
	}
	return nil
}

// planReturn places a return sequence at the function's fentry site.
func planReturn(t Target, e *Edit) (PlannedEdit, error) {
	sym, err := symbolOf(t, e)
	if err != nil {
		return PlannedEdit{}, err
	}
	var value int64
	if e.Value != nil {
		value = *e.Value
	}
	seq, err := ReturnSequence(value, e.Void)
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
	site := head[off : off+SiteLen]
	pe := PlannedEdit{
		Kind: KindReturn, Symbol: sym.Name, SymbolAddr: sym.Addr, SymbolSize: sym.Size, Offset: off, VA: sym.Addr + off,
		New: seq,
	}
	switch {
	case IsFentryNop(site):
		pe.Old = append([]byte(nil), site...) // exactly what a revert puts back
	case bytes.Equal(site, seq):
		pe.Applied, pe.Old = true, guestFentryNop(t)
	default:
		return PlannedEdit{}, fmt.Errorf("the fentry site of %s at %#x (%s+%#x) is not free: found % x, want a 5-byte NOP (% x): %s",
			sym.Name, pe.VA, sym.Name, off, site, codearea.FentryNops, siteTaken(site, pe.VA, t.Describe))
	}
	pe.Before, _ = introspect.Disassemble(pe.Old, pe.VA)
	pe.After, _ = introspect.Disassemble(pe.New, pe.VA)
	return pe, nil
}

// decodeSlack is how far past an edit the planner reads so that the
// instruction holding the edit's last byte decodes whole.
const decodeSlack = 15

// planBytes checks a bytes edit against memory and instruction boundaries.
func planBytes(t Target, e *Edit, opt PlanOptions) (PlannedEdit, error) {
	sym, err := symbolOf(t, e)
	if err != nil {
		return PlannedEdit{}, err
	}
	off, n := *e.Offset, uint64(len(e.Expect))
	if sym.Size > 0 && off+n > sym.Size {
		return PlannedEdit{}, fmt.Errorf("%s+%#x..+%#x is past the end of %s (size %#x)", sym.Name, off, off+n, sym.Name, sym.Size)
	}
	code := make([]byte, off+n+decodeSlack)
	if err := t.ReadVirt(sym.Addr, code); err != nil {
		return PlannedEdit{}, fmt.Errorf("reading %s at %#x: %w", sym.Name, sym.Addr, err)
	}
	cur := code[off : off+n]
	pe := PlannedEdit{
		Kind: KindBytes, Symbol: sym.Name, SymbolAddr: sym.Addr, SymbolSize: sym.Size, Offset: off, VA: sym.Addr + off,
		Old: append([]byte(nil), e.Expect...), New: append([]byte(nil), e.Replace...),
	}
	switch {
	case bytes.Equal(cur, e.Expect):
	case bytes.Equal(cur, e.Replace):
		pe.Applied = true
	default:
		return PlannedEdit{}, fmt.Errorf("bytes at %s+%#x (%#x) differ: expected % x, found % x", sym.Name, off, pe.VA, e.Expect, cur)
	}
	// Instruction boundaries of the original code, decoded from the
	// function's start (with the expected bytes in place, so an already
	// applied edit is judged by the code it replaced).
	orig := append([]byte(nil), code...)
	copy(orig[off:], e.Expect)
	insts, derr := introspect.Disassemble(orig, sym.Addr)
	first, last := -1, -1
	for i, in := range insts {
		s, end := in.Addr-sym.Addr, in.Addr-sym.Addr+uint64(in.Len)
		if s <= off && off < end {
			first = i
		}
		if s < off+n && off+n <= end {
			last = i
			break
		}
	}
	if first < 0 || last < 0 {
		return PlannedEdit{}, fmt.Errorf("cannot decode the instructions of %s up to +%#x: %v", sym.Name, off+n, derr)
	}
	pe.Before = insts[first : last+1]
	start, end := insts[first].Addr, insts[last].Addr+uint64(insts[last].Len)
	whole := first == last && start == pe.VA && end == pe.VA+n
	if !whole {
		if !opt.RIPChecked {
			return PlannedEdit{}, fmt.Errorf("%s+%#x..+%#x does not replace exactly one whole instruction (it touches %d instruction(s) at %s+%#x..+%#x: %s); use the RIP-checked mode to allow it",
				sym.Name, off, off+n, last-first+1, sym.Name, start-sym.Addr, end-sym.Addr, instText(pe.Before))
		}
		pe.RIPCheck, pe.CheckStart, pe.CheckEnd = true, start, end
	}
	// The new bytes must decode and fill the range exactly, or the next
	// original instruction would be read from the middle of one.
	after := append([]byte(nil), orig[start-sym.Addr:end-sym.Addr]...)
	copy(after[pe.VA-start:], e.Replace)
	pe.After, err = introspect.Disassemble(after, start)
	if err != nil {
		return PlannedEdit{}, fmt.Errorf("the replacement bytes at %s+%#x do not decode: %w", sym.Name, off, err)
	}
	if whole && len(pe.After) == 0 {
		return PlannedEdit{}, fmt.Errorf("the replacement bytes at %s+%#x decode to nothing", sym.Name, off)
	}
	return pe, nil
}

func instText(insts []introspect.Inst) string {
	var parts []string
	for _, in := range insts {
		parts = append(parts, in.Text)
	}
	return strings.Join(parts, "; ")
}

// chunks splits [va, va+len) at guest page boundaries.
func chunks(t Target, va uint64, old, new []byte) ([]Chunk, error) {
	var out []Chunk
	for done := 0; done < len(old); {
		cur := va + uint64(done)
		gpa, pageSize, err := t.Translate(cur)
		if err != nil {
			return nil, fmt.Errorf("translating %#x: %w", cur, err)
		}
		if pageSize == 0 {
			pageSize = 4096
		}
		n := min(uint64(len(old)-done), pageSize-cur%pageSize)
		out = append(out, Chunk{VA: cur, GPA: gpa, Old: old[done : done+int(n)], New: new[done : done+int(n)]})
		done += int(n)
	}
	return out, nil
}

func disassemble(code []byte, addr uint64) ([]introspect.Inst, error) {
	return introspect.Disassemble(code, addr)
}
