package patcher

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// A small guest kernel in 8 MiB of RAM with real page tables, enough for
// codearea to place objects (the layout of codearea's own test fixture):
// the kernel image is one 2 MiB page at fxText, the direct map one 1 GiB
// page, and the first MiB holds the BIOS data area and a trampoline.
const (
	fxPGD       = 0x200000
	fxPUDKernel = 0x201000
	fxPUDDirect = 0x202000
	fxImagePA   = 0x400000
	fxPMDKernel = 0x403000
	fxText      = 0xffffffff81000000
	fxDirect    = 0xffff888000000000
	fxTramp     = 0x98000
	fxTrampSize = 0x6000

	ptP, ptW, ptPS, ptNX = 1, 2, 0x80, 1 << 63
)

type ram struct{ b []byte }

func (m *ram) ReadPhys(gpa uint64, p []byte) error {
	if gpa+uint64(len(p)) > uint64(len(m.b)) {
		return &hypervisor.AccessError{Op: "read", GPA: gpa, Len: len(p), What: "not RAM"}
	}
	copy(p, m.b[gpa:])
	return nil
}
func (m *ram) WritePhys(gpa uint64, p []byte) error {
	if gpa+uint64(len(p)) > uint64(len(m.b)) {
		return &hypervisor.AccessError{Op: "write", GPA: gpa, Len: len(p), What: "not RAM"}
	}
	copy(m.b[gpa:], p)
	return nil
}
func (m *ram) Regions() []hypervisor.Region {
	return []hypervisor.Region{{GPA: 0, Size: uint64(len(m.b)), Name: "pc.ram"}}
}
func (m *ram) Close() error        { return nil }
func (m *ram) put64(gpa, v uint64) { binary.LittleEndian.PutUint64(m.b[gpa:], v) }

// Functions of the fixture kernel: fentry NOP, xor eax,eax, ret. show_stat
// is there twice (two static functions of that name).
var fixtureFuncs = []struct {
	name string
	off  uint64
}{
	{"version_proc_show", 0x10000}, {"cmdline_proc_show", 0x10040},
	{"show_stat", 0x10080}, {"show_stat", 0x100c0}, {"seq_printf", 0x10100},
}

func newKernelFixture() (*introspect.Kernel, *ram) {
	m := &ram{b: make([]byte, 8<<20)}
	idx := func(va uint64, level int) uint64 { return (va >> (12 + 9*(level-1))) & 511 }
	m.put64(fxPGD+idx(fxText, 4)*8, fxPUDKernel|ptP|ptW)
	m.put64(fxPUDKernel+idx(fxText, 3)*8, fxPMDKernel|ptP|ptW)
	m.put64(fxPMDKernel+idx(fxText, 2)*8, fxImagePA|ptP|ptW|ptPS)
	m.put64(fxPGD+idx(fxDirect, 4)*8, fxPUDDirect|ptP|ptW)
	m.put64(fxPUDDirect, 0|ptP|ptW|ptPS|ptNX)
	binary.LittleEndian.PutUint16(m.b[0x40e:], 0x9fc0)
	binary.LittleEndian.PutUint16(m.b[0x413:], 639)
	for i := uint64(0); i < fxTrampSize; i += 64 {
		m.b[fxTramp+i] = 0x90
	}
	syms := []symbols.Symbol{
		{Name: "_text", Addr: fxText, Type: 'T'},
		{Name: "real_mode_header", Addr: fxText + 0x1000, Type: 'D'},
		{Name: "real_mode_blob", Addr: fxText + 0x2000, Type: 'D'},
		{Name: "real_mode_blob_end", Addr: fxText + 0x2000 + fxTrampSize - 0x10, Type: 'D'},
		{Name: "level2_kernel_pgt", Addr: fxText + (fxPMDKernel - fxImagePA), Type: 'D'},
		{Name: "init_uts_ns", Addr: fxText + 0x11000, Type: 'D'},
		{Name: "_end", Addr: fxText + 0x200000, Type: 'B'},
	}
	for _, f := range fixtureFuncs {
		syms = append(syms, symbols.Symbol{Name: f.name, Addr: fxText + f.off, Type: 't'})
		copy(m.b[fxImagePA+f.off:], []byte{0x0f, 0x1f, 0x44, 0x00, 0x00, 0x31, 0xc0, 0xc3, 0xcc})
	}
	m.put64(fxImagePA+0x1000, fxDirect+fxTramp)
	k := &introspect.Kernel{
		Mem: m, AS: introspect.NewAddressSpace(m, fxPGD, false), CR3: fxPGD,
		TextStart: fxText, TextEnd: fxText + 0x200000, DirectMapBase: fxDirect,
		Symbols: symbols.NewTable(syms),
	}
	return k, m
}

// ramWriter writes the fixture's RAM by guest-physical address and logs
// each stop's writes.
type ramWriter struct {
	m     *ram
	stops [][]uint64 // guest-physical addresses written, per stop
}

func (w *ramWriter) Name() string                          { return "ram" }
func (w *ramWriter) Capabilities() hypervisor.Capabilities { return hypervisor.Capabilities{} }
func (w *ramWriter) Stop(ctx context.Context) (StoppedGuest, error) {
	w.stops = append(w.stops, nil)
	return &ramStopped{w, len(w.stops) - 1}, nil
}

type ramStopped struct {
	w *ramWriter
	n int
}

func (s *ramStopped) Read(va, gpa uint64, p []byte) error { return s.w.m.ReadPhys(gpa, p) }
func (s *ramStopped) Write(va, gpa uint64, p []byte) error {
	s.w.stops[s.n] = append(s.w.stops[s.n], gpa)
	return s.w.m.WritePhys(gpa, p)
}
func (s *ramStopped) Registers(context.Context) ([]hypervisor.CPUState, error) {
	return nil, hypervisor.ErrNoRegisters
}
func (s *ramStopped) Resume() (FreezeReport, error) { return FreezeReport{Method: "ram"}, nil }

// buildTwoFunctions compiles one object with two replacement functions,
// and a second object with a third, with the project's flags.
func buildTwoFunctions(t *testing.T) (two, other string) {
	t.Helper()
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	flags, err := exec.Command("make", "-s", "-C", filepath.Join(root, "examples/replace"), "replace-flags").Output()
	if err != nil {
		t.Skipf("make replace-flags: %v", err)
	}
	dir := t.TempDir()
	srcs := map[string]string{
		"two": "struct seq_file; extern void seq_printf(struct seq_file *, const char *, ...);\n" +
			"int new_version(struct seq_file *m, void *v) { seq_printf(m, \"version\\n\"); return 0; }\n" +
			"int new_cmdline(struct seq_file *m, void *v) { seq_printf(m, \"cmdline\\n\"); return 0; }\n" +
			"int not_code = 1;\n",
		"other": "struct seq_file; extern void seq_printf(struct seq_file *, const char *, ...);\n" +
			"int new_stat(struct seq_file *m, void *v) { seq_printf(m, \"stat\\n\"); return 0; }\n",
	}
	for name, src := range srcs {
		c := filepath.Join(dir, name+".c")
		if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		if b, err := exec.Command("gcc", append(strings.Fields(string(flags)), "-c", c, "-o", filepath.Join(dir, name+".o"))...).CombinedOutput(); err != nil {
			t.Skipf("gcc: %v\n%s", err, b)
		}
	}
	return filepath.Join(dir, "two.o"), filepath.Join(dir, "other.o")
}

func fileSHA(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func twoReplacePatch(obj string) *Patch {
	return &Patch{ID: "multi", Match: Match{Release: StringList{"*"}}, Edits: []Edit{
		{Kind: KindReplace, Function: "version_proc_show", Object: obj, With: "new_version"},
		{Kind: KindReplace, Function: "cmdline_proc_show", Object: obj, With: "new_cmdline"},
	}}
}

// Two replace edits naming one object: one placement, linked once, one
// code-area entry named after the patch and the object; each jump leads to
// its own function. Apply writes code and both jumps in one stop; revert
// removes both jumps in one stop.
func TestPlanTwoReplacesOneObject(t *testing.T) {
	two, _ := buildTwoFunctions(t)
	k, m := newKernelFixture()
	pristine := bytes.Clone(m.b)
	tgt := KernelTarget{k}
	p := twoReplacePatch(two)
	pl, err := MakePlan(tgt, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pl.Edits) != 2 {
		t.Fatalf("%d planned edits", len(pl.Edits))
	}
	a, b := pl.Edits[0].Replace, pl.Edits[1].Replace
	if a == nil || b == nil || a.Placement == nil || a.Placement != b.Placement {
		t.Fatalf("the edits should share one placement: %+v %+v", a, b)
	}
	if a.Entry != "multi:two.o" || b.Entry != a.Entry || a.Placement.Name != a.Entry {
		t.Errorf("entry names %q %q (placement %q), want multi:two.o", a.Entry, b.Entry, a.Placement.Name)
	}
	if fmt.Sprint(a.Edits) != "[0 1]" || a.SHA256 != fileSHA(t, two) {
		t.Errorf("edits %v sha %s", a.Edits, a.SHA256)
	}
	want := map[string]uint64{}
	for _, s := range a.LinkMap.Symbols {
		want[s.Name] = s.Addr
	}
	for i, e := range pl.Edits {
		r := e.Replace
		if r.WithAddr == 0 || r.WithAddr != want[r.With] {
			t.Errorf("edit %d: jumps to %#x, %s is at %#x in the link map", i+1, r.WithAddr, r.With, want[r.With])
		}
		if to, ok := codearea.JumpTarget(e.VA, e.New); !ok || to != r.WithAddr {
			t.Errorf("edit %d: new bytes % x at %#x do not jump to %#x", i+1, e.New, e.VA, r.WithAddr)
		}
		if e.VA != fxText+fixtureFuncs[i].off {
			t.Errorf("edit %d at %#x", i+1, e.VA)
		}
	}
	if want["new_version"] == want["new_cmdline"] {
		t.Error("both edits jump to the same place")
	}
	if !bytes.Equal(m.b, pristine) {
		t.Fatal("planning wrote guest memory")
	}

	// Apply: one stop holds the code-area writes and both jumps.
	w := &ramWriter{m: m}
	d := Domain{Name: "fx", UUID: "0000-1111", Target: tgt, Writer: w}
	pt := &Patcher{State: StateDir{Dir: t.TempDir()}}
	res, err := pt.Apply(context.Background(), d, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(w.stops) != 1 {
		t.Fatalf("apply took %d stops, want 1", len(w.stops))
	}
	wrote := map[uint64]bool{}
	for _, gpa := range w.stops[0] {
		wrote[gpa] = true
	}
	for _, e := range res.Plan.Edits {
		if !wrote[e.Chunks[0].GPA] {
			t.Errorf("the jump of %s was not written in the apply's stop", e.Symbol)
		}
	}
	k.AS.Flush()
	area, err := codearea.Find(k)
	if err != nil || len(area.Entries()) != 1 || area.Entries()[0].Name != "multi:two.o" {
		t.Fatalf("code area after apply: %+v %v", area.Entries(), err)
	}
	j, _ := pt.State.Load("fx", "0000-1111")
	for i, je := range j.Patches[0].Edits {
		if je.AreaEntry != "multi:two.o" || je.With != p.Edits[i].With || je.ObjectSHA256 != a.SHA256 {
			t.Errorf("journal edit %d: %+v", i+1, je)
		}
	}
	st, err := pt.Reconcile(d)
	if err != nil || st.Patches[0].Memory != MemApplied {
		t.Fatalf("status: %+v %v", st, err)
	}
	again, err := MakePlan(tgt, p, PlanOptions{})
	if err != nil || !again.AlreadyApplied() || again.Edits[1].Replace.Entry != "multi:two.o" {
		t.Fatalf("plan while applied: %v", err)
	}

	// Revert: both jumps go in the first stop. The fixture has no BTF to
	// list threads, so the release that follows refuses (state releasing).
	w.stops = nil
	_, err = pt.Revert(context.Background(), d, p.ID)
	if err == nil || !strings.Contains(err.Error(), "jumps are removed") {
		t.Fatalf("revert: %v", err)
	}
	if len(w.stops) < 1 || len(w.stops[0]) != 2 {
		t.Fatalf("revert stops %v: want both jumps removed in the first", w.stops)
	}
	for _, f := range fixtureFuncs[:2] {
		if got := m.b[fxImagePA+f.off : fxImagePA+f.off+5]; !bytes.Equal(got, FentryNop) {
			t.Errorf("%s after revert: % x", f.name, got)
		}
	}
	j, _ = pt.State.Load("fx", "0000-1111")
	if len(j.Patches) != 1 || j.Patches[0].State != StateReleasing {
		t.Fatalf("journal after the refused release: %+v", j.Patches)
	}
}

// Edits of different objects get one placement each, on distinct pages,
// installed in the same stop.
func TestPlanReplacesTwoObjects(t *testing.T) {
	two, other := buildTwoFunctions(t)
	k, m := newKernelFixture()
	tgt := KernelTarget{k}
	p := twoReplacePatch(two)
	pos := 2
	p.Edits = append(p.Edits, Edit{Kind: KindReplace, Function: "show_stat", Sympos: &pos, Object: other, With: "new_stat"})
	pl, err := MakePlan(tgt, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r0, r2 := pl.Edits[0].Replace, pl.Edits[2].Replace
	if r0.Placement == r2.Placement || r2.Entry != "multi:other.o" || fmt.Sprint(r2.Edits) != "[2]" {
		t.Fatalf("placements: %q %q %v", r0.Entry, r2.Entry, r2.Edits)
	}
	if pl.Edits[2].VA != fxText+0x100c0 {
		t.Errorf("sympos 2 of show_stat: %#x", pl.Edits[2].VA)
	}
	if r0.Placement.TextVA == r2.Placement.TextVA || r0.Placement.DataVA == r2.Placement.DataVA && len(r2.Placement.Image.Data) > 0 {
		t.Errorf("the placements overlap: text %#x %#x", r0.Placement.TextVA, r2.Placement.TextVA)
	}
	w := &ramWriter{m: m}
	d := Domain{Name: "fx", UUID: "0000-2222", Target: tgt, Writer: w}
	pt := &Patcher{State: StateDir{Dir: t.TempDir()}}
	if _, err := pt.Apply(context.Background(), d, p, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	k.AS.Flush()
	area, err := codearea.Find(k)
	if err != nil || len(area.Entries()) != 2 || len(w.stops) != 1 {
		t.Fatalf("after apply: %d stops, entries %+v %v", len(w.stops), area.Entries(), err)
	}
	if err := area.CheckMapping(k.AS); err != nil {
		t.Fatal(err)
	}
	for _, e := range pl.Edits {
		got := make([]byte, len(e.Replace.Placement.Image.Text))
		if err := k.AS.ReadVirt(e.Replace.Placement.TextVA, got); err != nil || !bytes.Equal(got, e.Replace.Placement.Image.Text) {
			t.Fatalf("%s: text in the guest differs from the image (%v)", e.Replace.Entry, err)
		}
	}
}

// Refusals before anything is written: an object whose hash is not the
// recorded one, a with symbol the object lacks or holds as data, an
// ambiguous function without sympos.
func TestPlanReplaceRefusals(t *testing.T) {
	two, _ := buildTwoFunctions(t)
	k, m := newKernelFixture()
	pristine := bytes.Clone(m.b)
	tgt := KernelTarget{k}
	w := &ramWriter{m: m}
	d := Domain{Name: "fx", UUID: "0000-3333", Target: tgt, Writer: w}
	pt := &Patcher{State: StateDir{Dir: t.TempDir()}}

	bad := strings.Repeat("ab", 32)
	p := twoReplacePatch(two)
	p.Objects = map[string]string{two: bad}
	_, err := pt.Apply(context.Background(), d, p, ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), "SHA-256 mismatch") || !strings.Contains(err.Error(), two) ||
		!strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), fileSHA(t, two)) {
		t.Fatalf("sha mismatch: %v", err)
	}
	t.Logf("refused: %v", err)
	p.Objects[two] = strings.ToUpper(fileSHA(t, two))
	if _, err := MakePlan(tgt, p, PlanOptions{}); err != nil {
		t.Fatalf("matching hash (upper case): %v", err)
	}

	cases := []struct {
		edit Edit
		want string
	}{
		{Edit{Kind: KindReplace, Function: "cmdline_proc_show", Object: two, With: "no_such_fn"}, "no_such_fn (with:) is not defined"},
		{Edit{Kind: KindReplace, Function: "cmdline_proc_show", Object: two, With: "not_code"}, "not in code"},
		{Edit{Kind: KindReplace, Function: "show_stat", Object: two, With: "new_cmdline"}, "add sympos"},
	}
	for _, c := range cases {
		p := twoReplacePatch(two)
		p.Edits[1] = c.edit
		_, err := MakePlan(tgt, p, PlanOptions{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.edit.String(), err, c.want)
		}
	}
	if len(w.stops) != 0 || !bytes.Equal(m.b, pristine) {
		t.Fatalf("refusals stopped the guest %d times or changed memory", len(w.stops))
	}
}

func TestEntryName(t *testing.T) {
	for _, c := range []struct{ id, obj, want string }{
		{"cve-2026-1234", "fix.o", "cve-2026-1234:fix.o"},
		{"p", "../build/dir/my fix.o", "p:my_fix.o"},
	} {
		if got := EntryName(c.id, c.obj); got != c.want {
			t.Errorf("EntryName(%q, %q) = %q, want %q", c.id, c.obj, got, c.want)
		}
	}
	long := EntryName(strings.Repeat("a", 64), strings.Repeat("b", 60)+".o")
	if len(long) > maxEntryName || !strings.HasPrefix(long, strings.Repeat("a", 64)+":") {
		t.Errorf("long name %q", long)
	}
}
