package codearea

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
)

// liveGuest is a booted guest with hvpatch attached.
type liveGuest struct {
	g    *testguest.Guest
	dom  *hypervisor.Domain
	mem  hypervisor.PhysMem
	k    *introspect.Kernel
	w    hypervisor.CodeWriter
	objs string // compiled objects
}

func attach(t *testing.T, kern testguest.Kernel) *liveGuest {
	t.Helper()
	g := testguest.Start(t, testguest.Options{Kernel: kern, VCPUs: 2, MemoryMiB: 512})
	lk := testkernel.Attach(t, g)
	dom, mem, k := lk.Dom, lk.Mem, lk.Kernel
	w, err := dom.NewCodeWriter(context.Background(), "", mem)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: accel %s, writer %s, _text %#x-_end %#x, %s paging", kern.Release, g.Accel, w.Name(), k.TextStart, k.TextEnd, k.PagingMode())
	return &liveGuest{g: g, dom: dom, mem: mem, k: k, w: w, objs: compileObjects(t, kern)}
}

// Replacement sources. A is the project's example; B prints another line
// through seq_puts (an exported function on 6.1, __seq_puts on 6.12).
const srcB = `
struct seq_file;
extern void SEQ_PUTS(struct seq_file *m, const char *s);
int hvpatch_version_b(struct seq_file *m, void *v)
{
	(void)v;
	SEQ_PUTS(m, "hvpatch replacement B says hello\n");
	return 0;
}
`

// Objects that must be refused.
var badSources = map[string]string{
	"unresolved": `
extern int hvpatch_no_such_kernel_function(int);
int bad_entry(void *m, void *v) { return hvpatch_no_such_kernel_function(1); }
`,
	// Thread-local storage needs TLS relocations (R_X86_64_TPOFF32).
	"reloc": `
__thread int hvpatch_tls;
int bad_entry(void *m, void *v) { return hvpatch_tls; }
`,
	// A GOT load: there is no GOT in the guest.
	"got": `
long bad_entry(void *m, void *v) { long x; asm("movq seq_printf@GOTPCREL(%%rip), %0" : "=r"(x)); return x; }
`,
	// 1 MiB of initialised data: more than the whole area.
	"toolarge": `
char hvpatch_big[1 << 20] = {1};
int bad_entry(void *m, void *v) { return hvpatch_big[(long)v]; }
`,
}

const (
	markerA = "(version_proc_show replaced by hvpatch)"
	markerB = "hvpatch replacement B says hello"
)

func compileObjects(t *testing.T, kern testguest.Kernel) string {
	t.Helper()
	seqPuts := "seq_puts"
	if kern.Series != "6.1" {
		seqPuts = "__seq_puts"
	}
	srcs := map[string]string{"b": strings.ReplaceAll(srcB, "SEQ_PUTS", seqPuts)}
	for n, s := range badSources {
		srcs[n] = s
	}
	return testkernel.BuildReplacements(t, kern, srcs)
}

// find is Find; releases need a writer that reads the vCPU registers
// during its stops.
func (lg *liveGuest) find() (*Area, error) {
	if !lg.w.Capabilities().Registers {
		return nil, fmt.Errorf("writer %s cannot read vCPU registers during its stops: the test releases code", lg.w.Name())
	}
	return Find(lg.k)
}

// snapshot hashes what the area may touch: the first MiB and the
// kernel-image PMD table.
func (lg *liveGuest) snapshot(t *testing.T) [32]byte {
	t.Helper()
	pmd, err := pmdTableOf(lg.mem, lg.k.CR3, lg.k.LA57, kernelImageStart)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, lowMemEnd+pageSize)
	if err := lg.mem.ReadPhys(0, b[:lowMemEnd]); err != nil {
		t.Fatal(err)
	}
	if err := lg.mem.ReadPhys(pmd, b[lowMemEnd:]); err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// setJump writes the entry jump (or the NOP back) at site under one stop,
// checking the bytes it replaces.
func (lg *liveGuest) setJump(site uint64, old, new []byte) (time.Duration, error) {
	t, err := lg.k.AS.Translate(site)
	if err != nil {
		return 0, err
	}
	sg, err := lg.w.Stop(context.Background())
	if err != nil {
		return 0, err
	}
	cur := make([]byte, 5)
	err = sg.Read(site, t.GPA, cur)
	if err == nil && !bytes.Equal(cur, old) {
		err = fmt.Errorf("site %#x holds % x, expected % x", site, cur, old)
	}
	if err == nil {
		err = sg.Write(site, t.GPA, new)
	}
	if err == nil {
		err = sg.Read(site, t.GPA, cur)
		if err == nil && !bytes.Equal(cur, new) {
			err = fmt.Errorf("site %#x reads back % x after writing % x", site, cur, new)
		}
	}
	rep, rerr := sg.Resume()
	return rep.Window, errors.Join(err, rerr)
}

// apply places obj in the area and points fn's entry at it; it returns the
// placement name.
func (lg *liveGuest) apply(t *testing.T, a *Area, obj, entry string) (*Placement, time.Duration) {
	t.Helper()
	o, err := linker.Load(filepath.Join(lg.objs, obj))
	if err != nil {
		t.Fatal(err)
	}
	opt, resolve, err := LinkFor(lg.k, "version_proc_show")
	if err != nil {
		t.Fatal(err)
	}
	site, err := EntrySite(lg.k, "version_proc_show")
	if err != nil {
		t.Fatal(err)
	}
	p, err := a.Plan(o, entry, resolve, opt)
	if err != nil {
		t.Fatal(err)
	}
	p.Site = site
	t0 := time.Now()
	if err := a.Install(context.Background(), lg.w, p); err != nil {
		t.Fatal(err)
	}
	d := time.Since(t0)
	jmp, err := JumpTo(site, p.Image.Entry)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lg.setJump(site, FentryNop, jmp); err != nil {
		t.Fatal(err)
	}
	return p, d
}

// revert takes the jump out, then releases the object (the order the
// package requires).
func (lg *liveGuest) revert(t *testing.T, a *Area, p *Placement) time.Duration {
	t.Helper()
	jmp, _ := JumpTo(p.Site, p.Image.Entry)
	if _, err := lg.setJump(p.Site, jmp, FentryNop); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := a.Release(context.Background(), lg.w, p.Name); err != nil {
		t.Fatal(err)
	}
	return time.Since(t0)
}

func (lg *liveGuest) version(t *testing.T) string {
	t.Helper()
	v, err := lg.g.ProcVersion()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(v)
}

// checkEmpty asserts that nothing of the area is left in the guest.
func (lg *liveGuest) checkEmpty(t *testing.T, a *Area) {
	t.Helper()
	for _, gpa := range append(append([]uint64{a.Header, a.PageTable}, a.TextPages...), a.DataPages...) {
		b := make([]byte, pageSize)
		if err := lg.mem.ReadPhys(gpa, b); err != nil {
			t.Fatal(err)
		}
		if !allZero(b) {
			t.Errorf("area page %#x is not zero after the last release", gpa)
		}
	}
	if e, err := readU64(lg.mem, a.PMDEntryGPA); err != nil || e != 0 {
		t.Errorf("PMD entry of slot %#x is %#x (%v) after the last release", a.Base, e, err)
	}
}

func TestGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	if len(kernels) == 0 {
		t.Fatal("no guest kernels built")
	}
	// HVPATCH_TEST_SERIES=6.1 runs one series only.
	only, ran := os.Getenv("HVPATCH_TEST_SERIES"), 0
	for _, kern := range kernels {
		if only != "" && kern.Series != only {
			continue
		}
		ran++
		t.Run(kern.Series, func(t *testing.T) { testKernel(t, kern) })
	}
	if ran == 0 {
		t.Fatalf("no guest kernel of series %q among %v", only, kernels)
	}
}

func testKernel(t *testing.T, kern testguest.Kernel) {
	lg := attach(t, kern)
	g := lg.g
	t.Logf("guest view of low memory:\n%s", g.MustRun("head -4 /proc/iomem; echo meltdown: $(cat /sys/devices/system/cpu/vulnerabilities/meltdown); dmesg | grep -iE 'first 1 ?MiB|real mode|trampoline|page tables isolation|BIOS-e820: \\[mem 0x0000000000000000' | head"))
	original := lg.version(t)
	before := lg.snapshot(t)

	a, err := lg.find()
	if err != nil {
		t.Fatal(err)
	}
	if a.Recovered {
		t.Fatal("a fresh guest already has a code area")
	}
	rep := a.Report
	t.Logf("%s: %s", kern.Release, rep.Summary())
	text, data := a.Free()
	t.Logf("area: slot %#x (PMD entry at %#x), header %#x, page table %#x, %d text pages %#x.., %d data pages; free %d text + %d data bytes",
		a.Base, a.PMDEntryGPA, a.Header, a.PageTable, len(a.TextPages), a.TextPages[0], len(a.DataPages), text, data)
	checkEvidence(t, lg, a)

	t.Run("Refused", func(t *testing.T) {
		for name, want := range map[string]any{
			"unresolved": new(*linker.UnresolvedError),
			"reloc":      nil, // any clear error naming the relocation or section
			"got":        new(*linker.RelocError),
			"toolarge":   new(*linker.SizeError),
		} {
			o, err := linker.Load(filepath.Join(lg.objs, name+".o"))
			if err == nil {
				opt, resolve, lerr := LinkFor(lg.k, "version_proc_show")
				if lerr != nil {
					t.Fatal(lerr)
				}
				_, err = a.Plan(o, "bad_entry", resolve, opt)
			}
			switch {
			case err == nil:
				t.Errorf("%s: accepted", name)
			case want != nil && !errors.As(err, want):
				t.Errorf("%s: error of the wrong kind: %v", name, err)
			case name == "reloc" && !strings.Contains(err.Error(), "TPOFF") && !strings.Contains(err.Error(), "tbss") && !strings.Contains(err.Error(), "TLS"):
				t.Errorf("%s: error does not name the problem: %v", name, err)
			}
			t.Logf("%s: %v", name, err)
		}
		if lg.snapshot(t) != before {
			t.Error("guest memory changed by refused objects")
		}
	})

	t.Run("ApplyRevert", func(t *testing.T) {
		p, d := lg.apply(t, a, "version_proc_show.o", "hvpatch_version_proc_show")
		t.Logf("installed %s: text %d bytes at %#x, data %d bytes at %#x, entry %#x, site %#x (%v)",
			p.Name, len(p.Image.Text), p.TextVA, len(p.Image.Data), p.DataVA, p.Image.Entry, p.Site, d)
		v := lg.version(t)
		if !strings.Contains(v, markerA) || !strings.Contains(v, kern.Release) {
			t.Fatalf("/proc/version with the replacement: %q", v)
		}
		t.Logf("/proc/version patched: %q", v)
		checkShared(t, lg, a)

		// A second daemon finds the area through its header.
		b, err := lg.find()
		if err != nil {
			t.Fatal(err)
		}
		if !b.Recovered || b.Base != a.Base || len(b.Entries()) != 1 || b.Entries()[0].Name != p.Name || b.Entries()[0].Site != p.Site {
			t.Fatalf("recovered area %+v, entries %+v", b, b.Entries())
		}
		// Releasing with the jump still in place is refused.
		if err := b.Release(context.Background(), lg.w, p.Name); err == nil || !strings.Contains(err.Error(), "remove it first") {
			t.Fatalf("release with the jump in place: %v", err)
		}
		lg.revert(t, b, p)
		if v := lg.version(t); v != original {
			t.Fatalf("/proc/version after revert: %q, was %q", v, original)
		}
		lg.checkEmpty(t, a)
		if lg.snapshot(t) != before {
			t.Error("first MiB or kernel-image PMD table differ from before the apply")
		}
		// Recreated identically: same slot, same pages.
		c, err := lg.find()
		if err != nil {
			t.Fatal(err)
		}
		if c.Recovered || c.Base != a.Base || c.Header != a.Header || c.PageTable != a.PageTable || c.TextPages[0] != a.TextPages[0] {
			t.Errorf("area after release: recovered %v base %#x header %#x, was base %#x header %#x", c.Recovered, c.Base, c.Header, a.Base, a.Header)
		}
	})
	if t.Failed() {
		return
	}

	// The release went through the recovered area; start from the guest's
	// state again.
	if a, err = lg.find(); err != nil || a.Recovered {
		t.Fatalf("area after release: recovered %v, %v", a != nil && a.Recovered, err)
	}
	t.Run("Cycles", func(t *testing.T) { testCycles(t, lg, a, original) })
	if v := lg.version(t); v != original {
		t.Errorf("final /proc/version %q, was %q", v, original)
	}
	lg.checkEmpty(t, a)
	if lg.snapshot(t) != before {
		t.Error("first MiB or kernel-image PMD table differ from before the test")
	}
}

// checkEvidence compares the free-page evidence with the guest's own view.
func checkEvidence(t *testing.T, lg *liveGuest, a *Area) {
	rep := a.Report
	joined := strings.Join(rep.Checks, "; ")
	for _, want := range []string{"PG_reserved", "zero-filled", "trampoline", "EBDA", "user page tables of"} {
		if !strings.Contains(joined, want) {
			t.Errorf("evidence lacks %q: %s", want, joined)
		}
	}
	// The trampoline per the guest's own kallsyms and dmesg.
	out := lg.g.MustRun("grep -w real_mode_header /proc/kallsyms")
	f := strings.Fields(out)
	if len(f) < 3 {
		t.Fatalf("guest kallsyms: %q", out)
	}
	addr, _ := strconv.ParseUint(f[0], 16, 64)
	if want, _ := lg.k.Symbols.Addr("real_mode_header"); addr != want {
		t.Errorf("real_mode_header at %#x, guest says %#x", want, addr)
	}
	for _, p := range append(append([]uint64{a.Header, a.PageTable}, a.TextPages...), a.DataPages...) {
		if p < lowGuard || p >= rep.Limit || (p >= rep.Trampoline[0] && p < rep.Trampoline[1]) {
			t.Errorf("area page %#x is in an excluded range", p)
		}
	}
	// The guest's own page-type view of every area page: reserved
	// (/proc/kpageflags bit 32 is KPF_RESERVED), never the allocator's.
	first, n := uint64(lowGuard/pageSize), uint64((rep.Limit-lowGuard)/pageSize)
	out, err := lg.g.Run(fmt.Sprintf("dd if=/proc/kpageflags bs=8 skip=%d count=%d 2>/dev/null | od -An -tx8 -v", first, n))
	if err != nil {
		t.Fatal(err)
	}
	flags := strings.Fields(out)
	if uint64(len(flags)) != n {
		t.Fatalf("guest /proc/kpageflags: %d values for %d pages: %q", len(flags), n, out)
	}
	for _, p := range append(append([]uint64{a.Header, a.PageTable}, a.TextPages...), a.DataPages...) {
		v, err := strconv.ParseUint(flags[p/pageSize-first], 16, 64)
		if err != nil || v&(1<<32) == 0 {
			t.Errorf("guest /proc/kpageflags of pfn %#x: %s lacks KPF_RESERVED", p/pageSize, flags[p/pageSize-first])
		}
	}
	t.Logf("guest /proc/kpageflags: all %d area pages KPF_RESERVED", 2+len(a.TextPages)+len(a.DataPages))
}

// checkShared verifies that every vCPU's kernel page tables and every
// process's own page tables map the area identically (one shared
// level2_kernel_pgt), and that QEMU's own walker agrees.
func checkShared(t *testing.T, lg *liveGuest, a *Area) {
	ctx := context.Background()
	cpus, err := lg.dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	roots := map[uint64]string{}
	for _, c := range cpus {
		roots[introspect.KernelCR3(c.CR3)] = fmt.Sprintf("vCPU %d", c.Index)
	}
	tasks, err := lg.k.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	procs := 0
	for _, task := range tasks {
		if task.MM == 0 {
			continue
		}
		as, err := lg.k.ProcessAddressSpace(task)
		if err != nil {
			t.Fatal(err)
		}
		roots[as.Root()] = fmt.Sprintf("PID %d (%s)", task.PID, task.Comm)
		procs++
	}
	if len(roots) < 2 {
		t.Fatalf("only %d page-table roots to compare", len(roots))
	}
	for root, who := range roots {
		if err := a.CheckMapping(introspect.NewAddressSpace(lg.mem, root, lg.k.LA57)); err != nil {
			t.Errorf("%s (CR3 %#x): %v", who, root, err)
		}
	}
	t.Logf("area mapped identically under %d page-table roots (%d vCPUs, %d processes)", len(roots), len(cpus), procs)
	out, err := lg.dom.HMP(ctx, fmt.Sprintf("gva2gpa %#x", a.TextVA(0)))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`gpa: (0x[0-9a-f]+)`).FindStringSubmatch(out)
	if m == nil {
		t.Errorf("QEMU gva2gpa %#x: %q", a.TextVA(0), strings.TrimSpace(out))
	} else if gpa, _ := strconv.ParseUint(m[1], 0, 64); gpa != a.TextPages[0] {
		t.Errorf("QEMU gva2gpa %#x = %#x, area says %#x", a.TextVA(0), gpa, a.TextPages[0])
	}
}

// testCycles applies and reverts 100 times, alternating two replacements
// placed at the same addresses and physical pages, while both vCPUs read
// /proc/version in a loop: a stale translation would show the other line.
func testCycles(t *testing.T, lg *liveGuest, a *Area, original string) {
	g := lg.g
	var pids []string
	for cpu := 0; cpu < 2; cpu++ {
		pid := strings.TrimSpace(g.MustRun(fmt.Sprintf(
			"(while :; do taskset -c %d readloop /proc/version 5; done) >/tmp/load%d 2>&1 & echo $!", cpu, cpu)))
		pids = append(pids, pid)
	}
	objs := []struct{ obj, entry, marker string }{
		{"version_proc_show.o", "hvpatch_version_proc_show", markerA},
		{"b.o", "hvpatch_version_b", markerB},
	}
	var installs, releases time.Duration
	const cycles = 100
	for i := 0; i < cycles; i++ {
		o := objs[i%2]
		p, d := lg.apply(t, a, o.obj, o.entry)
		installs += d
		if v := lg.version(t); !strings.Contains(v, o.marker) {
			t.Fatalf("cycle %d: /proc/version %q, expected the line of %s", i, v, o.entry)
		}
		releases += lg.revert(t, a, p)
		if v := lg.version(t); v != original {
			t.Fatalf("cycle %d: /proc/version after revert %q", i, v)
		}
	}
	t.Logf("%d cycles: install %v, release %v on average; %d releases waited for the code to fall out of use", cycles, installs/cycles, releases/cycles, a.Waits)
	g.MustRun("kill " + strings.Join(pids, " "))
	time.Sleep(6 * time.Second) // the last readloop round finishes
	for cpu := 0; cpu < 2; cpu++ {
		out := g.MustRun(fmt.Sprintf("cat /tmp/load%d", cpu))
		counts := map[string]int{}
		for _, line := range strings.Split(out, "\n") {
			n, text, ok := strings.Cut(line, "\t")
			if !ok {
				continue
			}
			c, _ := strconv.Atoi(strings.TrimSpace(n))
			switch {
			case strings.Contains(text, "(version_proc_show"):
				counts["A"] += c
			case strings.Contains(text, "hvpatch replacement B"):
				counts["B"] += c
			case strings.HasPrefix(original, text):
				counts["original"] += c
			default:
				t.Errorf("vCPU %d read an unexpected line: %q", cpu, text)
			}
		}
		t.Logf("vCPU %d reader: %v", cpu, counts)
		if counts["original"] == 0 || counts["A"]+counts["B"] == 0 {
			t.Errorf("vCPU %d reader did not see both the original and a replacement: %v\n%s", cpu, counts, out)
		}
	}
}
