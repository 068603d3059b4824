package service

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/linker"
	"github.com/hvpatch/hvpatch/patcher"
)

// The dry-run text of a replace edit shows the jump and the link map.
func TestWritePlanReplace(t *testing.T) {
	lm := &linker.LinkMap{Entry: "my_show", EntryAddr: 0xffffffffc0001000, TextBase: 0xffffffffc0001000, TextSize: 0x26,
		Imports:     []linker.ImportedSymbol{{Name: "seq_printf", Addr: 0xffffffff8157f550}},
		Relocations: []linker.AppliedReloc{{Section: ".text", Offset: 0x1a, Type: "R_X86_64_PLT32", Symbol: "seq_printf", Addend: -4, Target: 0xffffffff8157f550, Width: 4}}}
	pl := &patcher.Plan{Patch: &patcher.Patch{ID: "r"}, Release: "6.1.0", Edits: []patcher.PlannedEdit{{
		Kind: patcher.KindReplace, Symbol: "version_proc_show", VA: 0xffffffff811f71c0,
		Old: patcher.FentryNop, New: []byte{0xe9, 1, 2, 3, 4},
		Replace: &patcher.ReplacePlan{Object: "fix.o", With: "my_show", LinkMap: lm},
	}}}
	p := PlanOf(pl)
	if len(p.Replacements) != 1 || p.Replacements[0].Edit != 1 || p.Replacements[0].LinkMap != lm {
		t.Fatalf("replacements %+v", p.Replacements)
	}
	var b bytes.Buffer
	PatchResult{DryRun: true, Plan: p}.WriteText(&b)
	out := b.String()
	for _, want := range []string{"edit 1: replace version_proc_show", "new: e9 01 02 03 04", "replaces version_proc_show with my_show from fix.o",
		"link map:", "seq_printf", "R_X86_64_PLT32"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry-run text lacks %q:\n%s", want, out)
		}
	}
}

// Two replace edits sharing one code-area entry: the entry and each jump
// target are shown per edit, the link map once.
func TestWritePlanSharedEntry(t *testing.T) {
	lm := &linker.LinkMap{Entry: "a", TextBase: 0xffffffffc0001000}
	rp := func(with string, addr uint64) *patcher.ReplacePlan {
		return &patcher.ReplacePlan{Object: "fix.o", With: with, WithAddr: addr, Entry: "cve:fix.o", SHA256: "ab12", LinkMap: lm}
	}
	pl := &patcher.Plan{Patch: &patcher.Patch{ID: "cve"}, Edits: []patcher.PlannedEdit{
		{Kind: patcher.KindReplace, Symbol: "f", Replace: rp("a", 0xffffffffc0001000)},
		{Kind: patcher.KindReplace, Symbol: "g", Replace: rp("b", 0xffffffffc0001040)},
	}}
	p := PlanOf(pl)
	if len(p.Replacements) != 2 || p.Replacements[0].LinkMap != lm || p.Replacements[1].LinkMap != nil || p.Replacements[1].SharesWith != 1 {
		t.Fatalf("replacements %+v", p.Replacements)
	}
	var b bytes.Buffer
	PatchResult{DryRun: true, Plan: p}.WriteText(&b)
	out := b.String()
	for _, want := range []string{"code-area entry cve:fix.o, object sha256 ab12", "(jump to 0xffffffffc0001040)", "shares the entry of edit 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry-run text lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "link map:") != 1 {
		t.Errorf("the link map should appear once:\n%s", out)
	}
}
