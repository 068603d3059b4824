package patcher

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/introspect"
)

var series = []string{"6.1", "6.12"}

func returnPatch(fn string, value int64) *Patch {
	return &Patch{ID: "kill-" + strings.ReplaceAll(fn, "_", "-"), Match: Match{Release: StringList{"*"}},
		Edits: []Edit{{Kind: KindReturn, Function: fn, Value: &value}}}
}

func bytesPatch(sym string, off uint64, expect, replace []byte) *Patch {
	return &Patch{ID: "bytes", Match: Match{Release: StringList{"*"}},
		Edits: []Edit{{Kind: KindBytes, Symbol: sym, Offset: &off, Expect: expect, Replace: replace}}}
}

func TestReturnSequences(t *testing.T) {
	cases := []struct {
		value int64
		void  bool
		want  []string
	}{
		{0, false, []string{"xor %eax,%eax", "ret"}},
		{1, false, []string{"pushq $0x1", "pop %rax", "ret"}},
		{-1, false, []string{"pushq $0xffffffffffffffff", "pop %rax", "ret"}},
		{127, false, []string{"pushq $0x7f", "pop %rax", "ret"}},
		{-128, false, []string{"pushq $0xffffffffffffff80", "pop %rax", "ret"}},
		{0, true, []string{"ret"}},
	}
	for _, c := range cases {
		seq, err := ReturnSequence(c.value, c.void)
		if err != nil {
			t.Fatal(err)
		}
		if len(seq) != SiteLen || !isReturnSequence(seq) {
			t.Fatalf("value %d: % x is not a %d-byte return sequence", c.value, seq, SiteLen)
		}
		insts, err := introspect.Disassemble(seq, 0)
		if err != nil {
			t.Fatal(err)
		}
		for i, w := range c.want {
			if !strings.HasPrefix(insts[i].Text, w) {
				t.Fatalf("value %d: instruction %d is %q, want %q (all: % x)", c.value, i, insts[i].Text, w, seq)
			}
		}
		for _, in := range insts[len(c.want):] {
			if in.Text != "int3" {
				t.Fatalf("value %d: padding after ret is %q, want int3", c.value, in.Text)
			}
		}
	}
	for _, v := range []int64{128, -129, 1 << 40} {
		if _, err := ReturnSequence(v, false); err == nil {
			t.Fatalf("value %d accepted", v)
		}
	}
}

// The build id read from the notes the kernel keeps in memory is the one
// in the vmlinux file the guest booted.
func TestBuildIDFromMemory(t *testing.T) {
	for _, s := range series {
		ft := loadFixture(t, s)
		id, err := BuildID(ft)
		if err != nil {
			t.Fatal(err)
		}
		if id == "" || id != ft.fix.VmlinuxBuildID {
			t.Fatalf("%s: build id from memory %q, vmlinux has %q", s, id, ft.fix.VmlinuxBuildID)
		}
	}
}

func TestPlanReturn(t *testing.T) {
	for _, s := range series {
		t.Run(s, func(t *testing.T) {
			ft := loadFixture(t, s)
			sym := ft.sym(t, "version_proc_show")
			pl, err := MakePlan(ft, returnPatch("version_proc_show", 0), PlanOptions{})
			if err != nil {
				t.Fatal(err)
			}
			e := pl.Edits[0]
			// 6.12 is built with IBT: the site follows endbr64.
			wantOff := uint64(0)
			if bytes.HasPrefix(ft.read(t, sym.Addr, 4), Endbr64) {
				wantOff = 4
			}
			if (s == "6.12") != (wantOff == 4) {
				t.Fatalf("endbr64 at the entry of %s on %s: %v", sym.Name, s, wantOff == 4)
			}
			if e.VA != sym.Addr+wantOff || e.Offset != wantOff {
				t.Fatalf("site at %#x (+%#x), want +%#x", e.VA, e.Offset, wantOff)
			}
			if !bytes.Equal(e.Old, FentryNop) || !bytes.Equal(ft.read(t, e.VA, 5), FentryNop) {
				t.Fatalf("old bytes % x", e.Old)
			}
			if e.RIPCheck || e.Applied || pl.AlreadyApplied() {
				t.Fatalf("flags %+v", e)
			}
			if len(e.Before) != 1 || !strings.HasPrefix(e.Before[0].Text, "nop") || e.After[0].Text != "xor %eax,%eax" {
				t.Fatalf("disassembly before %v after %v", e.Before, e.After)
			}
			if len(e.Chunks) != 1 || e.Chunks[0].GPA != e.VA-fakePhysOffset {
				t.Fatalf("chunks %+v", e.Chunks)
			}
			if pl.BuildID != ft.fix.VmlinuxBuildID || pl.BootID == "" {
				t.Fatalf("plan identity %q %q", pl.BuildID, pl.BootID)
			}
		})
	}
}

// With function tracing on for version_proc_show (memory captured from a
// guest with set_ftrace_filter/current_tracer set), the site holds a call
// to the ftrace trampoline and a return edit is refused.
func TestPlanReturnRefusesFtraceSite(t *testing.T) {
	for _, s := range series {
		ft := loadFixture(t, s)
		ft.load(t, ft.fix.TracedMemory)
		before := ft.snapshot()
		_, err := MakePlan(ft, returnPatch("version_proc_show", 0), PlanOptions{})
		if err == nil || !strings.Contains(err.Error(), "taken by ftrace") || !strings.Contains(err.Error(), "version_proc_show") {
			t.Fatalf("%s: error %v, want the site reported as taken by ftrace", s, err)
		}
		ft.requireUnchanged(t, before)
	}
}

func TestPlanReturnSiteStates(t *testing.T) {
	ft := loadFixture(t, "6.1")
	sym := ft.sym(t, "version_proc_show")
	set := func(b []byte) {
		for i, c := range b {
			ft.mem[sym.Addr+uint64(i)] = c
		}
	}
	seq, _ := ReturnSequence(0, false)
	set(seq)
	pl, err := MakePlan(ft, returnPatch("version_proc_show", 0), PlanOptions{})
	if err != nil || !pl.AlreadyApplied() {
		t.Fatalf("site holding the same sequence: plan %v err %v, want already applied", pl, err)
	}
	if _, err := MakePlan(ft, returnPatch("version_proc_show", 1), PlanOptions{}); err == nil || !strings.Contains(err.Error(), "already holds a return sequence") {
		t.Fatalf("another return value over an applied one: %v", err)
	}
	set([]byte{0xe9, 0, 0, 0, 0})
	if _, err := MakePlan(ft, returnPatch("version_proc_show", 0), PlanOptions{}); err == nil || !strings.Contains(err.Error(), "livepatch") || !strings.Contains(err.Error(), fmt.Sprintf("%#x", sym.Addr+5)) {
		t.Fatalf("jmp at the site: %v", err)
	}
}

func TestPlanRefusals(t *testing.T) {
	ft := loadFixture(t, "6.1")
	sym := ft.sym(t, "cmdline_proc_show")
	cases := []struct {
		name string
		p    *Patch
		want []string
	}{
		{"unknown symbol", returnPatch("no_such_function", 0), []string{"unknown symbol no_such_function", ft.release}},
		{"release", &Patch{ID: "r", Match: Match{Release: StringList{"5.10.*"}}, Edits: returnPatch("version_proc_show", 0).Edits},
			[]string{"5.10.*", "the guest runs " + ft.release}},
		{"build id", &Patch{ID: "b", Match: Match{BuildIDs: StringList{"00112233"}}, Edits: returnPatch("version_proc_show", 0).Edits},
			[]string{"00112233", ft.fix.VmlinuxBuildID}},
		{"wrong expected bytes", bytesPatch("cmdline_proc_show", 0x18, []byte{0xbe, 0x0b, 0, 0, 0}, []byte{0xbe, 0x21, 0, 0, 0}),
			[]string{"expected be 0b 00 00 00, found be 0a 00 00 00", "cmdline_proc_show+0x18"}},
		// "mov $0xa,%esi" is be 0a 00 00 00 at +0x18; one byte less ends
		// inside it, and two bytes from +0x16 span two instructions.
		{"inside an instruction", bytesPatch("cmdline_proc_show", 0x18, []byte{0xbe, 0x0a, 0, 0}, []byte{0xbe, 0x21, 0, 0}),
			[]string{"does not replace exactly one whole instruction", "mov $0xa,%esi"}},
		{"across a boundary", bytesPatch("cmdline_proc_show", 0x16, []byte{0x89, 0xdf, 0xbe}, []byte{0x90, 0x90, 0xbe}),
			[]string{"does not replace exactly one whole instruction", "2 instruction(s)"}},
		{"replacement not whole", bytesPatch("cmdline_proc_show", 0x18, []byte{0xbe, 0x0a, 0, 0, 0}, []byte{0x90, 0x90, 0x90, 0x90, 0xbe}),
			[]string{"do not decode"}},
		{"past the function", bytesPatch("cmdline_proc_show", sym.Size, []byte{0xcc}, []byte{0x90}), []string{"past the end of cmdline_proc_show"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := ft.snapshot()
			_, err := MakePlan(ft, c.p, PlanOptions{})
			if err == nil {
				t.Fatal("planned, want a refusal")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
			ft.requireUnchanged(t, before)
		})
	}
}

func TestPlanBytes(t *testing.T) {
	ft := loadFixture(t, "6.1")
	sym := ft.sym(t, "cmdline_proc_show")
	// The example patch was written for this very build.
	p, err := LoadPatch("../configs/patches/cmdline-bang.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pl, err := MakePlan(ft, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := pl.Edits[0]
	if e.VA != sym.Addr+0x18 || e.RIPCheck || len(e.Before) != 1 || e.Before[0].Text != "mov $0xa,%esi" || e.After[0].Text != "mov $0x21,%esi" {
		t.Fatalf("edit %+v", e)
	}
	// The same bytes on the 6.12 build are refused by its build id.
	if _, err := MakePlan(loadFixture(t, "6.12"), p, PlanOptions{}); err == nil || !strings.Contains(err.Error(), "kernel release 6.1.0-56-cloud-amd64") {
		t.Fatalf("6.12: %v", err)
	}
	// Across a boundary, the RIP-checked mode plans it with the range of
	// the two instructions to keep vCPUs out of.
	cross := bytesPatch("cmdline_proc_show", 0x16, []byte{0x89, 0xdf, 0xbe}, []byte{0x90, 0x90, 0xbe})
	pl, err = MakePlan(ft, cross, PlanOptions{RIPChecked: true})
	if err != nil {
		t.Fatal(err)
	}
	e = pl.Edits[0]
	if !e.RIPCheck || e.CheckStart != sym.Addr+0x15 || e.CheckEnd != sym.Addr+0x1d || !pl.NeedsRIPCheck() {
		t.Fatalf("rip check range %#x..%#x (function at %#x), flags %v", e.CheckStart, e.CheckEnd, sym.Addr, e.RIPCheck)
	}
}

func TestPlanOverlappingEdits(t *testing.T) {
	ft := loadFixture(t, "6.1")
	p := returnPatch("version_proc_show", 0)
	off := uint64(0)
	p.Edits = append(p.Edits, Edit{Kind: KindBytes, Symbol: "version_proc_show", Offset: &off, Expect: FentryNop, Replace: []byte{0xe8, 0, 0, 0, 0}})
	if _, err := MakePlan(ft, p, PlanOptions{}); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("overlapping edits: %v", err)
	}
}

func TestChunksSplitAtPages(t *testing.T) {
	ft := loadFixture(t, "6.1")
	va := uint64(fakePhysOffset + 2<<20 - 3)
	cs, err := chunks(ft, va, []byte{1, 2, 3, 4, 5}, []byte{6, 7, 8, 9, 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 2 || len(cs[0].Old) != 3 || cs[1].VA != fakePhysOffset+2<<20 || cs[1].GPA != 2<<20 || cs[1].New[0] != 9 {
		t.Fatalf("chunks %+v", cs)
	}
}

// sympos picks among static functions of the same name in address order;
// without it an ambiguous name is refused with the candidates listed.
func TestSympos(t *testing.T) {
	ft := &fakeTarget{release: "r", syms: map[string][]Symbol{
		// Out of address order, with an alias at one address.
		"show_stat": {{Name: "show_stat", Addr: 0x3000}, {Name: "show_stat", Addr: 0x1000, Size: 0x40}, {Name: "show_stat", Addr: 0x1000}},
		"one":       {{Name: "one", Addr: 0x5000}, {Name: "one", Addr: 0x5000}},
	}}
	if s, err := editSymbol(ft, "one", 0); err != nil || s.Addr != 0x5000 {
		t.Errorf("aliases at one address are one symbol: %+v %v", s, err)
	}
	if s, err := uniqueSymbol(ft, "one"); err != nil || s.Addr != 0x5000 {
		t.Errorf("uniqueSymbol with aliases: %+v %v", s, err)
	}
	_, err := editSymbol(ft, "show_stat", 0)
	for _, want := range []string{"ambiguous", "sympos 1 at 0x1000", "sympos 2 at 0x3000", "add sympos"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ambiguous without sympos: %v, want %q", err, want)
		}
	}
	if s, err := editSymbol(ft, "show_stat", 1); err != nil || s.Addr != 0x1000 || s.Size != 0x40 {
		t.Errorf("sympos 1: %+v %v", s, err)
	}
	if s, err := editSymbol(ft, "show_stat", 2); err != nil || s.Addr != 0x3000 {
		t.Errorf("sympos 2: %+v %v", s, err)
	}
	if _, err := editSymbol(ft, "show_stat", 3); err == nil || !strings.Contains(err.Error(), "sympos 3") || !strings.Contains(err.Error(), "2 symbol(s)") {
		t.Errorf("sympos 3: %v", err)
	}
	if _, err := editSymbol(ft, "none", 1); err == nil || !strings.Contains(err.Error(), "unknown symbol") {
		t.Errorf("unknown: %v", err)
	}
}
