package codearea

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
)

func TestScanLowMemory(t *testing.T) {
	k, _ := newFixture()
	rep, err := ScanLowMemory(k)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(rep.Summary())
	free := map[uint64]bool{}
	for _, p := range rep.Free {
		free[p] = true
	}
	for _, c := range []struct {
		page uint64
		free bool
		why  string
	}{
		{0, false, "page 0"},
		{0x6000, false, "below 64 KiB"},
		{0x10000, true, ""},
		{fxDirty, false, "not zero-filled"},
		{fxMapped, false, "is mapped at 0xffffc90000000000"},
		{fxTable, false, "is a page-table page"},
		{fxTramp, false, "real-mode trampoline"},
		{fxTramp + fxTrampSize - pageSize, false, "real-mode trampoline"},
		{fxTramp + fxTrampSize, true, ""},
		{0x9f000, false, "EBDA/ROM"},
		{0xf0000, false, "EBDA/ROM"},
	} {
		if free[c.page] != c.free {
			t.Errorf("page %#x: free %v, want %v (%s)", c.page, free[c.page], c.free, rep.Rejected[c.page])
		}
		if !c.free && !strings.Contains(rep.Rejected[c.page], c.why) {
			t.Errorf("page %#x rejected for %q, want %q", c.page, rep.Rejected[c.page], c.why)
		}
	}
	// 0x10000..0x9f000 less the dirty, mapped, table and trampoline pages.
	if want := (0x9f000-0x10000)/pageSize - 3 - fxTrampSize/pageSize; len(rep.Free) != want {
		t.Errorf("%d free pages, want %d", len(rep.Free), want)
	}
	if rep.Limit != 0x9f000 || rep.EBDA != 0x9fc00 || rep.Trampoline != [2]uint64{fxTramp, fxTramp + fxTrampSize} {
		t.Errorf("limit %#x EBDA %#x trampoline %#x", rep.Limit, rep.EBDA, rep.Trampoline)
	}
}

func TestScanLowMemoryLowEBDA(t *testing.T) {
	k, m := newFixture()
	m.b[0x40e], m.b[0x40f] = 0x00, 0x50 // EBDA at 0x50000
	rep, err := ScanLowMemory(k)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Limit != 0x50000 || rep.Free[len(rep.Free)-1] != 0x4f000 {
		t.Errorf("limit %#x, last free %#x", rep.Limit, rep.Free[len(rep.Free)-1])
	}
}

func TestHeader(t *testing.T) {
	h := &header{Version: headerVersion, Base: 0xffffffff81400000, PMDEntry: fxPMDKernel + 80, PageTable: 0x11000,
		Text: []uint64{0x12000}, Data: []uint64{0x13000}, Entries: []Entry{{Name: "f", TextPages: 1, TextSize: 10, Entry: 0xffffffff81401000}}}
	page, err := h.encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeHeader(page)
	if err != nil {
		t.Fatal(err)
	}
	if got.Base != h.Base || got.Entries[0] != h.Entries[0] || got.Text[0] != 0x12000 {
		t.Errorf("round trip: %+v", got)
	}
	page[40] ^= 1
	if _, err := decodeHeader(page); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("corrupted header: %v", err)
	}
	for i := 0; i < 100; i++ {
		h.Entries = append(h.Entries, Entry{Name: strings.Repeat("x", 40)})
	}
	if _, err := h.encode(); err == nil || !strings.Contains(err.Error(), "does not fit") {
		t.Errorf("oversized header: %v", err)
	}
}

func TestEncodings(t *testing.T) {
	if e := entry(0x12345, pteText); e != 0x12000|1|0x20|0x40 {
		t.Errorf("text PTE %#x", e)
	}
	if e := entry(0x13000, pteData); e != 0x8000000000013063 {
		t.Errorf("data PTE %#x", e)
	}
	if e := entry(0x11000, pmdTable); e != 0x11063 {
		t.Errorf("PMD entry %#x", e)
	}
	for _, c := range []struct{ from, to uint64 }{{0xffffffff81000010, 0xffffffff81400000}, {0xffffffff81400000, 0xffffffff81000010}} {
		b, err := JumpTo(c.from, c.to)
		if err != nil {
			t.Fatal(err)
		}
		if to, ok := JumpTarget(c.from, b); !ok || to != c.to || b[0] != 0xe9 || len(b) != 5 {
			t.Errorf("jump %#x -> %#x: % x decodes to %#x", c.from, c.to, b, to)
		}
	}
	if _, err := JumpTo(0xffffffff81000000, 0xffff888000000000); err == nil {
		t.Error("out-of-reach jump accepted")
	}
}

func TestEntrySite(t *testing.T) {
	k, m := newFixture()
	fn := uint64(fxText + 0x10000)
	if site, err := EntrySite(k, "version_proc_show"); err != nil || site != fn {
		t.Errorf("site %#x, %v", site, err)
	}
	copy(m.b[fxImagePA+0x10000:], append(append([]byte{}, Endbr64...), FentryNop...))
	if site, err := EntrySite(k, "version_proc_show"); err != nil || site != fn+4 {
		t.Errorf("IBT site %#x, %v", site, err)
	}
	copy(m.b[fxImagePA+0x10004:], []byte{0xe8, 1, 2, 3, 4})
	if _, err := EntrySite(k, "version_proc_show"); err == nil || !strings.Contains(err.Error(), "e8 01 02 03 04") {
		t.Errorf("traced site: %v", err)
	}
}

// objects compiles the example replacement and a few more with the
// project's flags (all kernel-dependent flags on).
func objects(t *testing.T) map[string]*linker.Object {
	t.Helper()
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	flags, err := exec.Command("make", "-s", "-C", filepath.Join(root, "examples/replace"), "replace-flags").Output()
	if err != nil {
		t.Fatalf("make replace-flags: %v", err)
	}
	srcs := map[string]string{
		"a": readFile(t, filepath.Join(root, "examples/replace/version_proc_show.c")),
		"b": "struct seq_file; extern void seq_printf(struct seq_file *, const char *, ...);\n" +
			"static int calls; int entry_b(struct seq_file *m, void *v) { seq_printf(m, \"b %d\\n\", ++calls); return 0; }\n",
		"big":        "int entry_big(void *m, void *v) { asm volatile(\".fill 300000, 1, 0x90\"); return 0; }\n",
		"unresolved": "extern int no_such(void); int entry_u(void *m, void *v) { return no_such(); }\n",
	}
	objs := map[string]*linker.Object{}
	for name, src := range srcs {
		c := filepath.Join(out, name+".c")
		if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		o := filepath.Join(out, name+".o")
		if b, err := exec.Command("gcc", append(strings.Fields(string(flags)), "-c", c, "-o", o)...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %s: %v\n%s", name, err, b)
		}
		if objs[name], err = linker.Load(o); err != nil {
			t.Fatal(err)
		}
	}
	return objs
}

func readFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestInstallRelease(t *testing.T) {
	objs := objects(t)
	k, m := newFixture()
	pristine := bytes.Clone(m.b)
	ctx := context.Background()
	w := &memWriter{mem: m}
	a, err := Find(k)
	if err != nil {
		t.Fatal(err)
	}
	if a.Base != 0xffffffff81400000 || a.PMDEntryGPA != fxPMDKernel+10*8 {
		t.Fatalf("slot %#x (entry %#x): want the first slot one past the image", a.Base, a.PMDEntryGPA)
	}
	if a.Header != 0x10000 || a.PageTable != 0x11000 || len(a.TextPages) != 64 || len(a.DataPages) != 64 {
		t.Fatalf("header %#x page table %#x, %d+%d pages", a.Header, a.PageTable, len(a.TextPages), len(a.DataPages))
	}
	opt, resolve, err := LinkFor(k, "version_proc_show")
	if err != nil || !opt.PlainReturns {
		t.Fatalf("LinkFor: %+v %v", opt, err)
	}

	// Refused objects: nothing planned, nothing written.
	if _, err := a.Plan(objs["unresolved"], "entry_u", resolve, opt); !errors.As(err, new(*linker.UnresolvedError)) {
		t.Errorf("unresolved: %v", err)
	}
	if _, err := a.Plan(objs["big"], "entry_big", resolve, opt); !errors.As(err, new(*linker.SizeError)) {
		t.Errorf("too large: %v", err)
	}
	if w.writes != 0 || !bytes.Equal(m.b, pristine) {
		t.Fatal("refused objects changed memory")
	}

	pa, err := a.Plan(objs["a"], "hvpatch_version_proc_show", resolve, opt)
	if err != nil {
		t.Fatal(err)
	}
	pa.Site = fxText + 0x10000
	if err := a.Install(ctx, w, pa); err != nil {
		t.Fatal(err)
	}
	if pa.TextVA != a.TextVA(0) || pa.DataVA != a.DataVA(0) || pa.Image.Entry != pa.TextVA {
		t.Errorf("placed text %#x data %#x entry %#x", pa.TextVA, pa.DataVA, pa.Image.Entry)
	}
	k.AS.Flush()
	got := make([]byte, len(pa.Image.Text))
	if err := k.AS.ReadVirt(pa.TextVA, got); err != nil || !bytes.Equal(got, pa.Image.Text) {
		t.Fatalf("text through the page tables: %v", err)
	}
	if err := a.CheckMapping(k.AS); err != nil {
		t.Fatal(err)
	}
	tr, _ := k.AS.Translate(pa.TextVA)
	td, _ := k.AS.Translate(pa.DataVA)
	if tr.Writable || tr.NX || !td.Writable || !td.NX {
		t.Errorf("rights: text %+v data %+v", tr, td)
	}

	// A second object, then recovery by a new Find.
	pb, err := a.Plan(objs["b"], "entry_b", resolve, opt)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Install(ctx, w, pb); err != nil {
		t.Fatal(err)
	}
	if pb.TextVA != a.TextVA(1) || pb.DataVA != a.DataVA(1) {
		t.Errorf("second object at %#x/%#x", pb.TextVA, pb.DataVA)
	}
	r, err := Find(k)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Recovered || len(r.Entries()) != 2 || r.Entries()[1].Name != "entry_b" || r.Base != a.Base {
		t.Fatalf("recovered %+v", r.Entries())
	}
	if _, err := r.Plan(objs["b"], "entry_b", resolve, opt); err == nil {
		t.Error("the same name placed twice")
	}

	// The jump still in place: refused, nothing written.
	jmp, _ := JumpTo(pa.Site, pa.Image.Entry)
	copy(m.b[fxImagePA+0x10000:], jmp)
	snap := bytes.Clone(m.b)
	if err := r.Release(ctx, w, pa.Name); err == nil || !strings.Contains(err.Error(), "remove it first") {
		t.Fatalf("release with the jump in place: %v", err)
	}
	if !bytes.Equal(m.b, snap) {
		t.Fatal("refused release changed memory")
	}
	copy(m.b[fxImagePA+0x10000:], FentryNop)

	// Still in use: a vCPU executing it, or a return address on a live
	// stack. A dead value below a sleeping thread's saved sp is not use.
	const stackPA = 0x500000
	r.threadsFn = func(*introspect.AddressSpace) ([]thread, error) {
		return []thread{{pid: 42, comm: "reader", stack: fxDirect + stackPA, sp: fxDirect + stackPA + 0x3f00}}, nil
	}
	w.cpus = []hypervisor.CPUState{{Index: 1, RIP: pa.TextVA + 3, RSP: fxDirect + stackPA + 0x3e00}}
	var busy *InUseError
	if err := r.ReleaseWait(ctx, w, pa.Name, 0); !errors.As(err, &busy) || !strings.Contains(err.Error(), "vCPU 1 executes it") {
		t.Fatalf("release while a vCPU runs the code: %v", err)
	}
	w.cpus = nil
	m.put64(stackPA+0x3f80, pa.TextVA+0x1e)
	snap = bytes.Clone(m.b)
	if err := r.ReleaseWait(ctx, w, pa.Name, 0); !errors.As(err, &busy) || !strings.Contains(err.Error(), "PID 42 (reader) has") {
		t.Fatalf("release while a stack returns into the code: %v", err)
	}
	if !bytes.Equal(m.b, snap) {
		t.Fatal("refused release changed memory")
	}
	m.put64(stackPA+0x3f80, pa.DataVA+8)
	if err := r.ReleaseWait(ctx, w, pa.Name, 0); !errors.As(err, &busy) || !strings.Contains(err.Error(), "PID 42 (reader) has") {
		t.Fatalf("release while a stack points into the data: %v", err)
	}
	m.put64(stackPA+0x3f80, 0)
	m.put64(stackPA+0x100, pa.TextVA+0x1e)

	// Release one: the other stays, mapped; release both: pristine.
	if err := r.Release(ctx, w, pa.Name); err != nil {
		t.Fatal(err)
	}
	k.AS.Flush()
	if err := r.CheckMapping(k.AS); err != nil {
		t.Fatal(err)
	}
	if !allZero(m.b[a.TextPages[0]:][:pageSize]) || allZero(m.b[a.TextPages[1]:][:pageSize]) {
		t.Error("wrong pages cleared")
	}
	if err := r.Release(ctx, w, pb.Name); err != nil {
		t.Fatal(err)
	}
	m.put64(stackPA+0x100, 0)
	if !bytes.Equal(m.b, pristine) {
		t.Fatal("memory differs from before the area existed")
	}
	if r.Mapped() {
		t.Error("area still marked mapped")
	}
	// The next life maps every address to the same physical page.
	n, err := Find(k)
	if err != nil {
		t.Fatal(err)
	}
	if n.Recovered || n.Base != a.Base || n.Header != a.Header || n.PageTable != a.PageTable ||
		n.TextVA(0) != a.TextVA(0) || n.TextVA(0) != n.Base+n.TextPages[0] || n.DataVA(3) != n.Base+n.DataPages[3] {
		t.Errorf("next life: base %#x header %#x text %#x", n.Base, n.Header, n.TextVA(0))
	}
	if tx, dx := r.Free(); tx != 64*pageSize || dx != 64*pageSize {
		t.Errorf("free %d/%d after releasing everything", tx, dx)
	}
}

// TestInstallRollback makes each write of an install fail (or write
// something else) in turn: memory must come back unchanged every time.
func TestInstallRollback(t *testing.T) {
	objs := objects(t)
	for failAt := 1; failAt <= 5; failAt++ {
		for _, corrupt := range []bool{false, true} {
			k, m := newFixture()
			pristine := bytes.Clone(m.b)
			a, err := Find(k)
			if err != nil {
				t.Fatal(err)
			}
			opt, resolve, _ := LinkFor(k, "version_proc_show")
			p, err := a.Plan(objs["a"], "hvpatch_version_proc_show", resolve, opt)
			if err != nil {
				t.Fatal(err)
			}
			w := &memWriter{mem: m, failAt: failAt, corrupt: corrupt}
			err = a.Install(context.Background(), w, p)
			if err == nil {
				t.Fatalf("write %d failing (corrupt %v): install succeeded", failAt, corrupt)
			}
			if !bytes.Equal(m.b, pristine) {
				t.Errorf("write %d failing (corrupt %v): memory changed; %v", failAt, corrupt, err)
			}
			if a.Mapped() || len(a.Entries()) != 0 {
				t.Errorf("write %d failing: area state kept the failed entry", failAt)
			}
		}
	}
}

// TestInstallRefusesChangedPage: a page taken since Find is not
// overwritten.
func TestInstallRefusesChangedPage(t *testing.T) {
	objs := objects(t)
	k, m := newFixture()
	a, err := Find(k)
	if err != nil {
		t.Fatal(err)
	}
	opt, resolve, _ := LinkFor(k, "version_proc_show")
	p, err := a.Plan(objs["a"], "hvpatch_version_proc_show", resolve, opt)
	if err != nil {
		t.Fatal(err)
	}
	m.b[a.PageTable+8] = 7
	snap := bytes.Clone(m.b)
	w := &memWriter{mem: m}
	if err := a.Install(context.Background(), w, p); err == nil || !strings.Contains(err.Error(), "nothing written") {
		t.Fatalf("install over a changed page: %v", err)
	}
	if w.writes != 0 || !bytes.Equal(m.b, snap) {
		t.Error("memory written")
	}
}

// TestFindRefusesBadHeader: a header that does not match the guest's page
// tables is reported, not reused or overwritten.
func TestFindRefusesBadHeader(t *testing.T) {
	objs := objects(t)
	k, m := newFixture()
	a, _ := Find(k)
	opt, resolve, _ := LinkFor(k, "version_proc_show")
	p, _ := a.Plan(objs["a"], "hvpatch_version_proc_show", resolve, opt)
	if err := a.Install(context.Background(), &memWriter{mem: m}, p); err != nil {
		t.Fatal(err)
	}
	m.put64(a.PMDEntryGPA, 0)
	if _, err := Find(k); err == nil || !strings.Contains(err.Error(), "PMD entry is 0x0") {
		t.Errorf("Find with the PMD entry gone: %v", err)
	}
	m.put64(a.PMDEntryGPA, entry(a.PageTable, pmdTable))
	m.b[a.Header+20] ^= 1
	if _, err := Find(k); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("Find with a corrupted header: %v", err)
	}
}

// TestFindIgnoresEarlierBoot: a header left in RAM by an earlier boot
// (another KASLR _text) is not recovered, and its pages are not reused.
func TestFindIgnoresEarlierBoot(t *testing.T) {
	objs := objects(t)
	k, m := newFixture()
	a, _ := Find(k)
	opt, resolve, _ := LinkFor(k, "version_proc_show")
	p, _ := a.Plan(objs["a"], "hvpatch_version_proc_show", resolve, opt)
	if err := a.Install(context.Background(), &memWriter{mem: m}, p); err != nil {
		t.Fatal(err)
	}
	k.TextStart += 4 << 20
	k.TextEnd += 4 << 20
	b, err := Find(k)
	if err != nil {
		t.Fatal(err)
	}
	if b.Recovered || b.Header == a.Header || b.PageTable == a.PageTable || b.TextPages[0] == a.TextPages[0] {
		t.Errorf("new boot: recovered %v, header %#x (old %#x), text %#x (old %#x)", b.Recovered, b.Header, a.Header, b.TextPages[0], a.TextPages[0])
	}
}
