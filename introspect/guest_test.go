package introspect

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
)

// liveKernel is one booted guest with hvpatch attached to it.
type liveKernel struct {
	g    *testguest.Guest
	dom  *hypervisor.Domain
	mem  hypervisor.PhysMem
	cpus []hypervisor.CPUState
	k    *Kernel
	// The guest's own view, read once: /proc/kallsyms is slow over serial.
	kallsyms []testguest.KallsymsEntry
}

func attachGuest(t *testing.T, k testguest.Kernel) *liveKernel {
	t.Helper()
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 2, MemoryMiB: 512})
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	dom, err := conn.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := dom.OpenPhysMem(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	cpus, err := dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kern, err := Open(ctx, mem, cpus)
	if err != nil {
		t.Fatalf("Open on %s (%s): %v", g.Name, k.Release, err)
	}
	t.Logf("%s: attached in %v (%s); %d symbols, BTF %v, _text %#x slide %#x", k.Release, kern.AttachTime,
		kern.Timings, kern.Symbols.Len(), kern.BTF != nil, kern.TextStart, kern.Slide)
	return &liveKernel{g: g, dom: dom, mem: mem, cpus: cpus, k: kern}
}

// TestGuest checks everything introspect recovers from the outside against
// what each guest kernel reports about itself.
func TestGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, kern := range uniqueSeries(kernels) {
		t.Run(kern.Series, func(t *testing.T) {
			t.Parallel()
			lk := attachGuest(t, kern)
			// Load a module before reading /proc/kallsyms, so one slow read
			// serves both the symbol and the module checks.
			if err := lk.g.LoadModule("dummy"); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			if lk.kallsyms, err = lk.g.Kallsyms(); err != nil {
				t.Fatal(err)
			}
			t.Logf("guest /proc/kallsyms: %d lines in %v", len(lk.kallsyms), time.Since(t0))
			t.Run("Image", func(t *testing.T) { testImage(t, lk) })
			t.Run("Kallsyms", func(t *testing.T) { testKallsyms(t, lk) })
			t.Run("Tasks", func(t *testing.T) { testTasks(t, lk) })
			t.Run("Modules", func(t *testing.T) { testModules(t, lk) })
			t.Run("Gva2gpa", func(t *testing.T) { testGva2gpa(t, lk) })
			t.Run("UserPageTables", func(t *testing.T) { testUserPageTables(t, lk) })
			t.Run("Dump", func(t *testing.T) { testDump(t, lk) })
		})
	}
}

func guestSym(t *testing.T, lk *liveKernel, name string) uint64 {
	t.Helper()
	for _, e := range lk.kallsyms {
		if e.Name == name && e.Module == "" {
			return e.Addr
		}
	}
	t.Fatalf("guest /proc/kallsyms has no %s", name)
	return 0
}

func testImage(t *testing.T, lk *liveKernel) {
	k := lk.k
	if k.Release != lk.g.Release {
		t.Errorf("Release %q, guest uname -r says %q", k.Release, lk.g.Release)
	}
	version, err := lk.g.ProcVersion()
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(version) != k.Banner {
		t.Errorf("Banner %q\nguest /proc/version %q", k.Banner, strings.TrimSpace(version))
	}
	if text := guestSym(t, lk, "_text"); k.TextStart != text || k.Slide != text-DefaultText {
		t.Errorf("TextStart %#x slide %#x; guest _text %#x", k.TextStart, k.Slide, text)
	}
	if end := guestSym(t, lk, "_end"); k.TextEnd != end {
		t.Errorf("TextEnd %#x; guest _end %#x", k.TextEnd, end)
	}
	// The physical base is what /proc/iomem calls "Kernel code".
	iomem := lk.g.MustRun("grep 'Kernel code' /proc/iomem")
	start, err := strconv.ParseUint(strings.TrimSpace(strings.SplitN(iomem, "-", 2)[0]), 16, 64)
	if err != nil {
		t.Fatalf("parsing /proc/iomem line %q: %v", iomem, err)
	}
	if k.PhysBase != start {
		t.Errorf("PhysBase %#x; guest /proc/iomem Kernel code at %#x", k.PhysBase, start)
	}
	// The direct map maps guest-physical 0 at its base: translating base+x
	// through the kernel's page tables must land on x.
	for _, pa := range []uint64{0x1000, k.PhysBase, 256 << 20} {
		tr, err := k.AS.Translate(k.DirectMapBase + pa)
		if err != nil || tr.GPA != pa {
			t.Errorf("direct map base %#x: +%#x translates to %+v, %v", k.DirectMapBase, pa, tr, err)
		}
	}
	if k.BTF == nil {
		t.Error("no BTF found; both test kernels have CONFIG_DEBUG_INFO_BTF")
	}
	// Open settles on the kernel's own top-level table.
	if pgd := guestSym(t, lk, "init_top_pgt"); k.CR3 != pgd-k.TextStart+k.PhysBase {
		t.Errorf("kernel page-table root %#x; init_top_pgt is at %#x (physical %#x)", k.CR3, pgd, pgd-k.TextStart+k.PhysBase)
	}
	if k.PagingMode() != "4-level" && k.PagingMode() != "5-level" {
		t.Errorf("paging %s", k.PagingMode())
	}
}

// kallsymsExceptions are /proc/kallsyms entries that are not in the kernel
// image's kallsyms, with the reason.
func kallsymsException(e testguest.KallsymsEntry) string {
	switch e.Module {
	case "":
		return ""
	case "bpf":
		return "BPF programs: registered at run time in bpf_kallsyms"
	case "__builtin__ftrace":
		return "ftrace trampolines: allocated at run time"
	case "__builtin__kprobes":
		return "kprobe instruction slots: allocated at run time"
	}
	return "module symbols: they live in each module's own symtab"
}

func testKallsyms(t *testing.T, lk *liveKernel) {
	type key struct {
		name string
		addr uint64
		typ  byte
	}
	want := map[key]int{}
	excepted := map[string]int{}
	for _, e := range lk.kallsyms {
		if why := kallsymsException(e); why != "" {
			excepted[why]++
			continue
		}
		want[key{e.Name, e.Addr, e.Type}]++
	}
	var wantN int
	for _, n := range want {
		wantN += n
	}
	got := lk.k.Symbols.All()
	if len(got) != wantN {
		t.Errorf("decoded %d symbols, guest lists %d for the image", len(got), wantN)
	}
	var missing []string
	for _, s := range got {
		kk := key{s.Name, s.Addr, s.Type}
		if want[kk] == 0 {
			missing = append(missing, fmt.Sprintf("%016x %c %s", s.Addr, s.Type, s.Name))
			continue
		}
		want[kk]--
	}
	var extra []string
	for kk, n := range want {
		for ; n > 0; n-- {
			extra = append(extra, fmt.Sprintf("%016x %c %s", kk.addr, kk.typ, kk.name))
		}
	}
	sort.Strings(missing)
	sort.Strings(extra)
	if len(missing) > 0 || len(extra) > 0 {
		t.Errorf("%d decoded symbols not in the guest's list, e.g. %v\n%d guest symbols not decoded, e.g. %v",
			len(missing), missing[:min(10, len(missing))], len(extra), extra[:min(10, len(extra))])
	}
	t.Logf("%d symbols identical to /proc/kallsyms; excepted: %v", len(got), excepted)
}

func testTasks(t *testing.T, lk *liveKernel) {
	before, err := lk.g.PS()
	if err != nil {
		t.Fatal(err)
	}
	tasks, err := lk.k.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	after, err := lk.g.PS()
	if err != nil {
		t.Fatal(err)
	}
	if len(tasks) == 0 || tasks[0].PID != 0 || tasks[0].Addr != guestSym(t, lk, "init_task") {
		t.Fatalf("first task is not init_task: %+v", tasks[:min(1, len(tasks))])
	}
	ours := map[int]Task{}
	for _, tk := range tasks[1:] {
		ours[tk.PID] = tk
		if tk.StackPointer == 0 {
			t.Errorf("PID %d (%s) has no saved stack pointer", tk.PID, tk.Comm)
		}
	}
	inGuest := map[int]testguest.Process{}
	for _, p := range before {
		inGuest[p.PID] = p
	}
	// The guest shell that ran the listings was still writing their output
	// to the serial port at our instant (seen in D, waiting on the tty):
	// its state says nothing about the listings'.
	shell, err := strconv.Atoi(strings.TrimSpace(lk.g.MustRun("echo $$")))
	if err != nil {
		t.Fatal(err)
	}
	busy := map[int]bool{shell: true}
	stable, sameState := 0, 0
	for _, p := range after {
		b, ok := inGuest[p.PID]
		inGuest[p.PID] = p
		if !ok || b.PPID != p.PPID || b.Comm != p.Comm {
			continue // came or went around our walk
		}
		stable++
		tk, ok := ours[p.PID]
		if !ok {
			t.Errorf("guest process %d (%s) missing from Tasks", p.PID, p.Comm)
			continue
		}
		// For kernel threads /proc shows the full name (kthread full_name,
		// or a kworker's current workqueue appended); task->comm holds the
		// first 15 bytes of it.
		kthread := p.PPID == 2 || p.PID == 2
		commOK := tk.Comm == p.Comm || kthread && len(tk.Comm) > 0 && strings.HasPrefix(p.Comm, tk.Comm)
		if tk.PPID != p.PPID || !commOK || tk.TGID != p.PID {
			t.Errorf("PID %d: ours ppid %d comm %q tgid %d; guest ppid %d comm %q", p.PID, tk.PPID, tk.Comm, tk.TGID, p.PPID, p.Comm)
		}
		// Kernel threads wake on timers and work items at any instant, so
		// their state at our walk can differ from both listings: require a
		// state a kernel thread can show. A user process that was asleep in
		// both listings (blocked in wait or read) is settled: its state
		// must match exactly.
		if kthread {
			if !strings.Contains("RSDI", tk.StateLetter()) {
				t.Errorf("kernel thread %d (%s): state %s (raw %#x) is not one a kernel thread shows", p.PID, p.Comm, tk.StateLetter(), tk.State)
			}
			continue
		}
		if b.State == p.State && p.State != 'R' && !busy[p.PID] {
			sameState++
			if tk.StateLetter() != string(p.State) {
				t.Errorf("PID %d (%s): state %s (raw %#x), guest shows %c", p.PID, p.Comm, tk.StateLetter(), tk.State, p.State)
			}
		}
	}
	for pid, tk := range ours {
		// Tasks in neither guest listing can only be kernel workers that
		// kthreadd started between the listings.
		if _, ok := inGuest[pid]; !ok && tk.PPID != 2 {
			t.Errorf("Tasks lists PID %d (%s, ppid %d) that the guest never showed", pid, tk.Comm, tk.PPID)
		}
	}
	if stable < 20 {
		t.Errorf("only %d processes were stable across the guest listings; expected the kernel threads at least", stable)
	}
	if sameState < 2 {
		t.Errorf("only %d user processes were in a settled state; expected init, the serial reader (cat) and sleep", sameState)
	}
	t.Logf("%d tasks; %d stable guest processes all matched (pid, ppid, comm); %d settled user processes matched their state", len(tasks), stable, sameState)
}

func testModules(t *testing.T, lk *liveKernel) {
	want, err := lk.g.Modules()
	if err != nil {
		t.Fatal(err)
	}
	got, err := lk.k.Modules()
	if err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 {
		t.Fatal("guest lists no modules after insmod dummy")
	}
	if len(got) != len(want) {
		t.Errorf("%d modules, guest lists %d: ours %+v guest %+v", len(got), len(want), got, want)
	}
	byName := map[string]Module{}
	for _, m := range got {
		byName[m.Name] = m
	}
	for _, w := range want {
		m, ok := byName[w.Name]
		if !ok || m.Base != w.Addr || m.Size != w.Size {
			t.Errorf("module %s: ours %+v, guest base %#x size %d", w.Name, m, w.Addr, w.Size)
		}
	}
}

// hmpTranslate asks QEMU (HMP gva2gpa, current monitor vCPU's CR3).
func hmpTranslate(ctx context.Context, dom *hypervisor.Domain, va uint64) (uint64, bool, error) {
	out, err := dom.HMP(ctx, fmt.Sprintf("gva2gpa %#x", va))
	if err != nil {
		return 0, false, err
	}
	out = strings.TrimSpace(out)
	if rest, ok := strings.CutPrefix(out, "gpa: "); ok {
		gpa, err := strconv.ParseUint(strings.TrimPrefix(rest, "0x"), 16, 64)
		return gpa, true, err
	}
	if strings.Contains(out, "Unmapped") {
		return 0, false, nil
	}
	return 0, false, fmt.Errorf("gva2gpa %#x: unexpected answer %q", va, out)
}

func testGva2gpa(t *testing.T, lk *liveKernel) {
	k := lk.k
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, uint64(k.TextStart)))
	type sample struct {
		what string
		va   uint64
	}
	var samples []sample
	for i := 0; i < 1000; i++ {
		samples = append(samples, sample{"kernel image", k.TextStart + rng.Uint64N(k.TextEnd-k.TextStart)})
	}
	var ram uint64
	for _, r := range k.Mem.Regions() {
		ram = max(ram, r.End())
	}
	for i := 0; i < 600; i++ {
		samples = append(samples, sample{"direct map", k.DirectMapBase + rng.Uint64N(ram)})
	}
	mods, err := k.Modules()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mods {
		for i := 0; i < 100; i++ {
			samples = append(samples, sample{"module " + m.Name, m.Base + rng.Uint64N(max(m.Size, 1))})
		}
	}
	tasks, err := k.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	stackOff, err := k.Offset("task_struct.stack")
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range tasks {
		stack, err := k.AS.ReadUint64(tk.Addr + stackOff)
		if err != nil {
			t.Fatal(err)
		}
		// Kernel stacks are 16 KiB, vmalloc'ed (VMAP_STACK), page by page.
		for off := uint64(0); off < 16<<10; off += 4096 {
			samples = append(samples, sample{"task stack", stack + off + rng.Uint64N(4096)})
		}
	}
	counts := map[string]int{}
	mismatches := 0
	t0 := time.Now()
	for _, s := range samples {
		tr, ourErr := k.AS.Translate(s.va)
		var gpa uint64
		var mapped bool
		// HMP uses the monitor vCPU's current CR3; should it be a user
		// process's PTI copy at that instant, kernel addresses look
		// unmapped. Ask again before calling it a difference.
		for try := 0; try < 3; try++ {
			if gpa, mapped, err = hmpTranslate(ctx, lk.dom, s.va); err != nil {
				t.Fatal(err)
			}
			if mapped == (ourErr == nil) {
				break
			}
		}
		switch {
		case mapped != (ourErr == nil) || mapped && gpa != tr.GPA:
			mismatches++
			if mismatches <= 10 {
				t.Errorf("%s %#x: ours %#x (%v), QEMU %#x mapped=%v", s.what, s.va, tr.GPA, ourErr, gpa, mapped)
			}
		default:
			counts[s.what+map[bool]string{true: "", false: " (unmapped)"}[mapped]]++
		}
	}
	if mismatches > 0 {
		t.Errorf("%d of %d translations differ from QEMU's", mismatches, len(samples))
	}
	t.Logf("%d addresses compared with gva2gpa in %v: %v", len(samples), time.Since(t0), counts)
}

func testUserPageTables(t *testing.T, lk *liveKernel) {
	out := lk.g.MustRun("pagemap 256 1500 >/tmp/pagemap.out & echo $!")
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("starting pagemap in the guest: %q", out)
	}
	defer lk.g.Run(fmt.Sprintf("kill %d", pid))
	var listing string
	for deadline := time.Now().Add(30 * time.Second); ; {
		listing = lk.g.MustRun("cat /tmp/pagemap.out")
		if strings.Contains(listing, "END") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pagemap did not finish: %q", listing)
		}
		time.Sleep(200 * time.Millisecond)
	}
	tasks, err := lk.k.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	var proc *Task
	for i := range tasks {
		if tasks[i].PID == pid {
			proc = &tasks[i]
		}
	}
	if proc == nil || proc.Comm != "pagemap" {
		t.Fatalf("PID %d (pagemap) not found in Tasks", pid)
	}
	as, err := lk.k.ProcessAddressSpace(*proc)
	if err != nil {
		t.Fatal(err)
	}
	n, bad := 0, 0
	sc := bufio.NewScanner(strings.NewReader(listing))
	for sc.Scan() {
		var va, pfn uint64
		if _, err := fmt.Sscanf(sc.Text(), "%x %x", &va, &pfn); err != nil {
			continue
		}
		n++
		tr, err := as.Translate(va)
		if err != nil || tr.GPA>>12 != pfn || !tr.User {
			bad++
			if bad <= 10 {
				t.Errorf("user %#x: ours %+v (%v), guest pagemap pfn %#x", va, tr, err, pfn)
			}
		}
	}
	if n < 256 {
		t.Fatalf("pagemap listed only %d present pages", n)
	}
	if bad > 0 {
		t.Errorf("%d of %d user pages differ from /proc/PID/pagemap", bad, n)
	}
	t.Logf("%d user pages of PID %d match /proc/%d/pagemap", n, pid, pid)
}

// testDump takes a memory-only ELF dump of the guest and requires the same
// answers from it as from the live guest.
func testDump(t *testing.T, lk *liveKernel) {
	ctx := context.Background()
	live := lk.k
	before, err := live.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "guest.elf")
	t0 := time.Now()
	if err := lk.dom.DumpMemory(ctx, path); err != nil {
		t.Fatal(err)
	}
	dumpTime := time.Since(t0)
	after, err := live.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	d, err := hypervisor.OpenELFDump(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	k, err := Open(ctx, d, d.CPUs())
	if err != nil {
		t.Fatal(err)
	}
	if k.Release != live.Release || k.Banner != live.Banner || k.TextStart != live.TextStart || k.TextEnd != live.TextEnd ||
		k.PhysBase != live.PhysBase || k.Slide != live.Slide || k.DirectMapBase != live.DirectMapBase || k.LA57 != live.LA57 {
		t.Errorf("dump kernel %+v\nlive kernel %+v", summary(k), summary(live))
	}
	if (k.BTF == nil) != (live.BTF == nil) {
		t.Errorf("BTF in dump %v, live %v", k.BTF != nil, live.BTF != nil)
	}
	ds, ls := k.Symbols.All(), live.Symbols.All()
	if len(ds) != len(ls) {
		t.Errorf("dump has %d symbols, live %d", len(ds), len(ls))
	}
	for i := range min(len(ds), len(ls)) {
		if ds[i] != ls[i] {
			t.Fatalf("symbol %d: dump %+v, live %+v", i, ds[i], ls[i])
		}
	}
	dmods, err := k.Modules()
	if err != nil {
		t.Fatal(err)
	}
	lmods, err := live.Modules()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(dmods) != fmt.Sprint(lmods) {
		t.Errorf("modules in dump %+v, live %+v", dmods, lmods)
	}
	dtasks, err := k.Tasks()
	if err != nil {
		t.Fatal(err)
	}
	type key struct {
		pid, ppid int
		comm      string
	}
	set := func(ts []Task) map[key]bool {
		m := map[key]bool{}
		for _, tk := range ts {
			m[key{tk.PID, tk.PPID, tk.Comm}] = true
		}
		return m
	}
	b, a, dm := set(before), set(after), set(dtasks)
	for kk := range b {
		if a[kk] && !dm[kk] {
			t.Errorf("task %+v, live before and after the dump, is not in the dump", kk)
		}
	}
	for kk := range dm {
		if !b[kk] && !a[kk] && kk.ppid != 2 {
			t.Errorf("dump has task %+v that the live guest never had", kk)
		}
	}
	t.Logf("dump of %d regions taken in %v; opened in %v (%s); %d symbols, %d tasks, %d modules identical",
		len(d.Regions()), dumpTime, k.AttachTime, k.Timings, len(ds), len(dtasks), len(dmods))
}

func summary(k *Kernel) string {
	return fmt.Sprintf("release %s text %#x-%#x phys %#x slide %#x directmap %#x la57 %v", k.Release, k.TextStart, k.TextEnd,
		k.PhysBase, k.Slide, k.DirectMapBase, k.LA57)
}

// uniqueSeries keeps one kernel per series (the guest builder lists one,
// but a list written by concurrent builds may repeat it).
func uniqueSeries(ks []testguest.Kernel) []testguest.Kernel {
	var out []testguest.Kernel
	seen := map[string]bool{}
	for _, k := range ks {
		if !seen[k.Series] {
			seen[k.Series] = true
			out = append(out, k)
		}
	}
	return out
}
