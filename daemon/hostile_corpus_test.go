package daemon

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/hostile"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// Bounds of the hostile-corpus test: generous safety bounds, not
// performance targets.
const (
	hostileRunBound = 60 * time.Second // one CLI command or API request
	hostileRSSBound = 2 << 30          // peak RSS of one CLI command
)

// hostileRequired are the cases issue 12 lists by name: the generator
// must make each of them from a real guest's dump.
var hostileRequired = []string{
	"btf-anon-self-module", "btf-anon-self-task_struct", "btf-module-mem-nelems",
	"btf-task_struct-size-16", "btf-task_struct-size-huge", "btf-module-size-16", "btf-module-offsets-huge",
	"pt-selfref-kernel-half", "codearea-header-huge-text-size", "codearea-header-overflow-pages",
	"kallsyms-fake-token-tables", "kallsyms-85k-aliases", "task-comm-inject", "banner-inject",
	"elf-note-huge", "truncated-half", "task-list-cycle", "module-list-self", "task-list-poison",
	"cr3-outside-ram",
}

// TestHostileCorpus makes a corpus of altered dumps from a real 6.12
// guest's dump (internal/hostile) and runs every introspection command of
// the CLI on each: it must answer, or exit non-zero with one clear line,
// within a bound, never crash, and never print guest bytes raw. Then
// hvpatchd, serving that guest and a witness, meets the memory cases
// through its API: they are written into the paused guest's memory one at
// a time (hvpatchd's API takes no dump file), and hvpatchd must answer
// every request, keep its pid and keep serving the witness.
func TestHostileCorpus(t *testing.T) {
	testguest.Need(t)
	kern, err := testguest.KernelSeries("6.12")
	if err != nil {
		t.Fatal(err)
	}
	g := testguest.Start(t, testguest.Options{Kernel: kern, VCPUs: 2, MemoryMiB: 256})
	if err := g.LoadModule("dummy"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dom, err := conn.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	clean := filepath.Join(dir, "clean.elf")
	if err := dom.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	err = dom.DumpMemory(ctx, clean)
	if rerr := dom.Resume(ctx); err == nil {
		err = rerr
	}
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	corpus, err := hostile.Generate(ctx, clean)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("corpus of %d cases planned from %s (%s) in %v", len(corpus.Cases), g.Name, g.Release, time.Since(t0).Round(time.Millisecond))
	for _, n := range corpus.Notes {
		t.Logf("generator note: %s", n)
	}
	have := map[string]bool{}
	for _, c := range corpus.Cases {
		have[c.Name] = true
	}
	for _, n := range hostileRequired {
		if !have[n] {
			t.Errorf("the generator made no case %s", n)
		}
	}
	_, bin := binaries(t)
	t.Run("CLI", func(t *testing.T) { hostileCLI(t, bin, corpus, dir) })
	os.Remove(clean)
	t.Run("hvpatchd", func(t *testing.T) { hostileDaemon(t, kern, g, dom) })
}

// cliRun is one run of the CLI.
type cliRun struct {
	args           []string
	stdout, stderr string
	code           int
	took           time.Duration
	rss            int64 // peak, bytes
	timedOut       bool
}

func runHostileCLI(bin string, args ...string) cliRun {
	ctx, cancel := context.WithTimeout(context.Background(), hostileRunBound)
	defer cancel()
	home, _ := os.MkdirTemp("", "hvpatch-hostile-home-")
	defer os.RemoveAll(home)
	cmd := exec.CommandContext(ctx, bin, append([]string{"--socket", testguest.LibvirtSocket(), "--daemon-socket", filepath.Join(home, "none.sock")}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + home, "LANG=C"}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	t0 := time.Now()
	err := cmd.Run()
	r := cliRun{args: args, took: time.Since(t0), stdout: o.String(), stderr: e.String(), timedOut: ctx.Err() != nil}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		r.code, r.stderr = -1, err.Error()
	}
	if cmd.ProcessState != nil {
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			r.rss = ru.Maxrss << 10
		}
	}
	return r
}

// crashRE is what a crash of a Go program looks like.
var crashRE = regexp.MustCompile(`panic:|fatal error:|goroutine \d+ \[|runtime error|SIGSEGV|%!\w\(`)

// rawControl finds a control character other than newline and tab.
func rawControl(s string) int {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 0x20 && c != '\n' && c != '\t') || c == 0x7f {
			return i
		}
	}
	return -1
}

// checkRun lists what is wrong with one CLI run on a hostile dump.
func checkRun(c hostile.Case, r cliRun) []string {
	var bad []string
	if r.timedOut {
		bad = append(bad, fmt.Sprintf("did not finish within %v", hostileRunBound))
	}
	if m := crashRE.FindString(r.stderr + r.stdout); m != "" {
		bad = append(bad, fmt.Sprintf("crashed (%q in the output)", m))
	}
	if r.rss > hostileRSSBound {
		bad = append(bad, fmt.Sprintf("peak RSS %d MiB", r.rss>>20))
	}
	switch {
	case r.code == 0:
		if i := rawControl(r.stdout); i >= 0 {
			bad = append(bad, fmt.Sprintf("raw control character %q in stdout: %q", r.stdout[i], r.stdout[max(0, i-40):min(len(r.stdout), i+40)]))
		}
		for _, line := range strings.Split(r.stdout, "\n") {
			for _, m := range c.Markers {
				if strings.HasPrefix(strings.TrimSpace(line), m) {
					bad = append(bad, fmt.Sprintf("injected text %q begins an output line: %q", m, line))
				}
			}
		}
	case r.code < 0:
		bad = append(bad, "killed: "+r.stderr)
	default:
		msg := strings.TrimSuffix(r.stderr, "\n")
		if msg == "" || strings.Contains(msg, "\n") {
			bad = append(bad, fmt.Sprintf("exit %d without one clear line on stderr: %q", r.code, r.stderr))
		} else if i := rawControl(msg); i >= 0 {
			bad = append(bad, fmt.Sprintf("raw control character in the error: %q", msg))
		}
		if strings.HasPrefix(c.Name, "truncated") && !strings.Contains(msg, "truncated") {
			bad = append(bad, "a truncated dump without saying so: "+msg)
		}
		if r.code == 2 {
			bad = append(bad, "exit 2 (usage error) for valid arguments: "+msg)
		}
	}
	return bad
}

var hostileCommands = []struct {
	name string
	args func(dump, target string) []string
}{
	{"info", func(d, _ string) []string { return []string{"info", "--dump", d} }},
	{"syms", func(d, _ string) []string { return []string{"syms", "--dump", d} }},
	{"ps", func(d, _ string) []string { return []string{"ps", "--dump", d} }},
	{"lsmod", func(d, _ string) []string { return []string{"lsmod", "--dump", d} }},
	{"read", func(d, t string) []string { return []string{"read", "--disasm", "--dump", d, t, "256"} }},
	{"sym", func(d, t string) []string { return []string{"sym", "--dump", d, t} }},
}

func hostileCLI(t *testing.T, bin string, corpus *hostile.Corpus, dir string) {
	// The clean dump first: every command answers.
	cleanOut := map[string]string{}
	for _, cmd := range hostileCommands {
		r := runHostileCLI(bin, cmd.args(corpus.Clean, hostile.DefaultTarget)...)
		if r.code != 0 {
			t.Fatalf("clean dump: hvpatch %s: exit %d: %s", strings.Join(r.args, " "), r.code, r.stderr)
		}
		cleanOut[cmd.name] = r.stdout
	}
	// Each case is written, run and removed in turn (the whole corpus
	// at once would be ~60 dumps), two at a time.
	type result struct {
		lines    []string // one per command
		problems []string
		slowest  time.Duration
		err      error
	}
	results := make([]result, len(corpus.Cases))
	var wg sync.WaitGroup
	next := make(chan int)
	t0 := time.Now()
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c := corpus.Cases[i]
				res := &results[i]
				path := filepath.Join(dir, c.Name+".elf")
				if res.err = corpus.Write(c, path); res.err != nil {
					continue
				}
				for _, cmd := range hostileCommands {
					r := runHostileCLI(bin, cmd.args(path, c.TargetOrDefault())...)
					res.slowest = max(res.slowest, r.took)
					for _, b := range checkRun(c, r) {
						res.problems = append(res.problems, fmt.Sprintf("%s: hvpatch %s: %s", c.Name, strings.Join(r.args, " "), b))
					}
					outcome := ""
					switch {
					case r.code != 0:
						outcome = fmt.Sprintf("exit %d: %s", r.code, firstLine(r.stderr, 160))
					case r.stdout == cleanOut[cmd.name]:
						outcome = "ok, as on the clean dump"
					default:
						outcome = fmt.Sprintf("ok, %d lines (clean: %d)", strings.Count(r.stdout, "\n"), strings.Count(cleanOut[cmd.name], "\n"))
					}
					res.lines = append(res.lines, fmt.Sprintf("    %-5s %6.2fs %4d MiB  %s", cmd.name, r.took.Seconds(), r.rss>>20, outcome))
				}
				os.Remove(path)
			}
		}()
	}
	for i := range corpus.Cases {
		next <- i
	}
	close(next)
	wg.Wait()
	t.Logf("%d cases × %d commands in %v", len(corpus.Cases), len(hostileCommands), time.Since(t0).Round(time.Millisecond))
	var slowest time.Duration
	var table strings.Builder
	for i, c := range corpus.Cases {
		res := results[i]
		if res.err != nil {
			t.Errorf("%s: %v", c.Name, res.err)
			continue
		}
		for _, p := range res.problems {
			t.Error(p)
		}
		slowest = max(slowest, res.slowest)
		fmt.Fprintf(&table, "%s: %s\n%s\n", c.Name, c.What, strings.Join(res.lines, "\n"))
	}
	t.Logf("results (slowest run %v):\n%s", slowest.Round(time.Millisecond), table.String())
}

func firstLine(s string, n int) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > n {
		s = s[:n] + "…"
	}
	return s
}

// hostileDaemon runs hvpatchd over the guest and a witness and writes each
// memory case into the paused guest in turn.
func hostileDaemon(t *testing.T, kern testguest.Kernel, g *testguest.Guest, dom *hypervisor.Domain) {
	w := testguest.Start(t, testguest.Options{Kernel: kern, VCPUs: 1, MemoryMiB: 256})
	// Every attach parses the guest's own kallsyms and BTF: with kernel
	// sharing a guest of a known build id reuses another guest's (and a
	// hostile one would not be read at all).
	t.Setenv("HVPATCHD_SHARE_KERNELS", "0")
	td := newTestDaemon(t, "")
	td.start()
	pid := td.cmd.Process.Pid
	ctx := context.Background()
	var info service.Info
	for _, name := range []string{g.Name, w.Name} {
		deadline := time.Now().Add(2 * time.Minute)
		for {
			err := td.get("/domains/"+name+"/info", &info)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("hvpatchd cannot read %s: %v", name, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	alive := func(when string) {
		t.Helper()
		var h Health
		if err := td.get("/health", &h); err != nil || h.PID != pid {
			t.Fatalf("%s: hvpatchd is gone (health %+v, %v); log:\n%s", when, h, err, tailLines(td.log(), 30))
		}
		var wi service.Info
		if err := td.get("/domains/"+w.Name+"/info", &wi); err != nil || wi.Release != w.Release {
			t.Errorf("%s: the witness %s: %+v, %v", when, w.Name, wi, err)
		}
		var ps []service.Task
		if err := td.get("/domains/"+w.Name+"/ps", &ps); err != nil || len(ps) < 10 {
			t.Errorf("%s: ps of the witness %s: %d tasks, %v", when, w.Name, len(ps), err)
		}
	}

	if err := dom.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			dom.Resume(ctx)
		}
	}()
	mem, err := dom.OpenPhysMem(ctx, "memfd")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	cpus, err := dom.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	plan, notes, err := hostile.PlanMemory(ctx, mem, cpus)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range notes {
		t.Logf("generator note (live): %s", n)
	}
	var table strings.Builder
	for i, c := range plan.Cases {
		// hvpatchd keeps the kernel it attached while the boot identity
		// holds; a vmemmap_base of this case's own makes it attach again,
		// to the altered memory.
		idEdit, err := identityEdit(plan, i)
		if err != nil {
			t.Fatal(err)
		}
		c.Mem = append(c.Mem, idEdit)
		undo, err := hostile.Apply(mem, c)
		if err != nil {
			t.Logf("%s: not written into the live guest: %v", c.Name, err)
			continue
		}
		target := url.QueryEscape(c.TargetOrDefault())
		var answered, failed []string
		for _, req := range []struct{ name, path string }{
			{"info", "info"}, {"ps", "ps"}, {"lsmod", "lsmod"}, {"syms", "syms?grep=%5Eversion_proc_"},
			{"sym", "sym?q=" + target}, {"read", "read?target=" + target + "&len=256&disasm=1"}, {"status", "status"},
		} {
			t0 := time.Now()
			err := td.get("/domains/"+g.Name+"/"+req.path, nil)
			took := time.Since(t0)
			var ae *apiError
			switch {
			case err == nil:
				answered = append(answered, req.name)
			case errors.As(err, &ae):
				failed = append(failed, fmt.Sprintf("    %s: HTTP %d: %s\n", req.name, ae.code, firstLine(ae.msg, 200)))
				if strings.Contains(ae.msg, "recovered from a panic") {
					t.Errorf("%s: %s: hvpatchd recovered from a panic (a parser bug): %s", c.Name, req.name, ae.msg)
				}
			default:
				t.Fatalf("%s: %s: no answer from hvpatchd: %v; log:\n%s", c.Name, req.name, err, tailLines(td.log(), 30))
			}
			if took > hostileRunBound {
				t.Errorf("%s: %s took %v", c.Name, req.name, took)
			}
		}
		fmt.Fprintf(&table, "%s: 200 for %s\n%s", c.Name, strings.Join(answered, " "), strings.Join(failed, ""))
		alive("after " + c.Name)
		if err := hostile.Restore(mem, undo); err != nil {
			t.Fatalf("%s: restoring the guest: %v", c.Name, err)
		}
	}
	t.Logf("API answers per memory case (guest paused, case written into its memory):\n%s", table.String())
	// Each case made hvpatchd attach anew to the altered memory (its
	// boot identity changed), and again once the memory was restored.
	if n := strings.Count(td.log(), "guest rebooted: kernel changed"); n < len(plan.Cases) {
		t.Errorf("hvpatchd attached anew %d times for %d cases: the cases were not all read", n, len(plan.Cases))
	}
	if err := dom.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	resumed = true

	// Operator input through the API, on the restored guest: a body over
	// the limit, a forged object, a patch of many edits.
	forged := forgedObject()
	pin := sha256.Sum256(forged)
	patch := "id: hostile-object\nmatch: {release: [\"6.*\"]}\nobjects:\n  evil.o: " + hex.EncodeToString(pin[:]) +
		"\nedits:\n  - {kind: replace, function: version_proc_show, object: evil.o, with: evil}\n"
	var many strings.Builder
	many.WriteString("id: many-edits\nmatch: {release: [\"6.*\"]}\nedits:\n")
	for many.Len() < 3<<20 {
		many.WriteString("  - {kind: return, function: version_proc_show, value: 0}\n")
	}
	for _, req := range []struct {
		name string
		body service.ApplyRequest
	}{
		{"oversized body", service.ApplyRequest{Patch: strings.Repeat("#", maxApplyBody+1)}},
		{"forged object", service.ApplyRequest{Patch: patch, Objects: map[string]string{"evil.o": base64.StdEncoding.EncodeToString(forged)}, DryRun: true}},
		{"3 MiB of edits", service.ApplyRequest{Patch: many.String(), DryRun: true}},
	} {
		t0 := time.Now()
		err := td.do("POST", "/domains/"+g.Name+"/apply", req.body, nil)
		var ae *apiError
		if !errors.As(err, &ae) {
			t.Errorf("apply with %s: %v, want an error answer", req.name, err)
		} else {
			t.Logf("apply with %s: HTTP %d in %v: %s", req.name, ae.code, time.Since(t0).Round(time.Millisecond), firstLine(ae.msg, 200))
		}
		alive("after apply with " + req.name)
	}

	// The guest itself is served again once its memory is its own.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var gi service.Info
		err := td.get("/domains/"+g.Name+"/info", &gi)
		if err == nil && gi.Release == g.Release {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hvpatchd does not serve %s again after its memory was restored: %v", g.Name, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if n, err := td.metric(`hvpatch_failures_total{reason="panic"}`); err == nil && n > 0 {
		t.Errorf("hvpatchd recovered from %v panics:\n%s", n, tailLines(td.log(), 30))
	}
	if strings.Contains(td.log(), "fatal error") {
		t.Errorf("fatal error in the hvpatchd log")
	}
}

// identityEdit gives vmemmap_base, a boot-identity variable, a value of
// case i's own.
func identityEdit(plan *hostile.MemPlan, i int) (hostile.Edit, error) {
	k := plan.Kernel
	a, err := k.SymbolAddr("vmemmap_base")
	if err != nil {
		return hostile.Edit{}, err
	}
	tr, err := k.AS.Translate(a)
	if err != nil {
		return hostile.Edit{}, err
	}
	v, err := k.AS.ReadUint64(a)
	if err != nil {
		return hostile.Edit{}, err
	}
	return hostile.Edit{GPA: tr.GPA, Data: binary.LittleEndian.AppendUint64(nil, v^uint64(i+1)<<30)}, nil
}

// forgedObject is an ELF relocatable whose headers claim 65535 sections
// far beyond its end.
func forgedObject() []byte {
	b := make([]byte, 4096)
	copy(b, "\x7fELF\x02\x01\x01")
	le := binary.LittleEndian
	le.PutUint16(b[16:], 1)  // ET_REL
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[40:], 1<<40) // e_shoff
	le.PutUint16(b[52:], 64)
	le.PutUint16(b[58:], 64)
	le.PutUint16(b[60:], 0xffff) // e_shnum
	le.PutUint16(b[62:], 0xfffe) // e_shstrndx
	for i := 64; i < len(b); i++ {
		b[i] = byte(i * 7)
	}
	return b
}
