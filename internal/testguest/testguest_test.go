package testguest

import (
	"strings"
	"sync"
	"testing"
	"time"
)

// Each built kernel boots and reports, from inside, the release of the
// kernel file it was booted from.
func TestBootEachKernel(t *testing.T) {
	Need(t)
	ks, err := Kernels()
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 2 {
		t.Fatalf("want the 6.1 and 6.12 kernels, got %v", ks)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) {
			t.Parallel()
			g := Start(t, Options{Kernel: k})
			t.Logf("%s booted under %s in %v", k.Release, g.Accel, g.BootDuration())
			got := strings.TrimSpace(g.MustRun("uname -r"))
			if got != k.Release {
				t.Fatalf("uname -r inside the guest = %q, kernel file is %q", got, k.Release)
			}
			if g.Release != k.Release {
				t.Fatalf("ready line release %q, want %q", g.Release, k.Release)
			}
		})
	}
}

func TestRunCommand(t *testing.T) {
	g := Start(t, Options{})
	out := g.MustRun("echo hello; echo $((6*7)); grep -c ^processor /proc/cpuinfo")
	if out != "hello\n42\n2\n" {
		t.Fatalf("output %q", out)
	}
	// Exit status and stderr come back; the shell survives a failing command.
	out, err := g.Run("echo to-stderr >&2; exit_with() { return $1; }; exit_with 3")
	if err == nil || !strings.Contains(err.Error(), "exited 3") || out != "to-stderr\n" {
		t.Fatalf("want exit 3 with stderr captured, got %q, %v", out, err)
	}
	// Commands that would read stdin get /dev/null instead of the harness's input.
	if out := g.MustRun("cat; echo after"); out != "after\n" {
		t.Fatalf("stdin not detached: %q", out)
	}
	// Large output arrives whole.
	if out := g.MustRun("seq 1 20000 | wc -l"); strings.TrimSpace(out) != "20000" {
		t.Fatalf("seq count %q", out)
	}
	if out := g.MustRun("seq 1 20000"); strings.Count(out, "\n") != 20000 || !strings.HasSuffix(out, "\n20000\n") {
		t.Fatalf("seq output has %d lines", strings.Count(out, "\n"))
	}
	// A command that outlives its timeout is reported, not hung on.
	if _, err := g.RunTimeout("sleep 30", 2*time.Second); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("want a timeout error, got %v", err)
	}
}

func TestGroundTruth(t *testing.T) {
	g := Start(t, Options{})
	syms, err := g.Kallsyms()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]KallsymsEntry{}
	for _, s := range syms {
		found[s.Name] = s
	}
	if len(syms) < 50000 {
		t.Fatalf("only %d kallsyms lines", len(syms))
	}
	for _, name := range []string{"_text", "_stext", "version_proc_show", "init_task"} {
		if found[name].Addr < 0xffffffff80000000 {
			t.Fatalf("%s at %#x: addresses are hidden or missing", name, found[name].Addr)
		}
	}
	if v, err := g.ProcVersion(); err != nil || !strings.Contains(v, g.Kernel.Release) {
		t.Fatalf("/proc/version %q, %v", v, err)
	}
	ps, err := g.PS()
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) < 10 || ps[0].PID != 1 || ps[0].Comm != "init" {
		t.Fatalf("ps: %+v", ps)
	}
	if err := g.LoadModule("dummy"); err != nil {
		t.Fatal(err)
	}
	mods, err := g.Modules()
	if err != nil {
		t.Fatal(err)
	}
	if len(mods) != 1 || mods[0].Name != "dummy" || mods[0].Addr < 0xffffffff80000000 || mods[0].Size == 0 {
		t.Fatalf("modules after insmod dummy: %+v", mods)
	}
}

// recordingTB stands in for the test so the helper's verdict can be checked
// instead of failing this test.
type recordingTB struct {
	testing.TB
	mu       sync.Mutex
	errors   []string
	cleanups []func()
}

func (r *recordingTB) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errors = append(r.errors, strings.SplitN(sprintf(format, args...), "\n", 2)[0])
}
func (r *recordingTB) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }
func (r *recordingTB) Failed() bool     { return len(r.errors) > 0 }

// A kernel crash on the console must fail the test that caused it.
func TestOopsFailsTheTest(t *testing.T) {
	rec := &recordingTB{TB: t}
	g := Start(rec, Options{VCPUs: 1})
	g.MustRun("true")
	if g.ConsoleError() != nil {
		t.Fatalf("console in trouble before the crash: %v", g.ConsoleError())
	}
	// The shell dies with the kernel, so the command times out; the error
	// must name the console's evidence.
	_, err := g.RunTimeout("echo c > /proc/sysrq-trigger", 20*time.Second)
	if err == nil {
		t.Fatal("crash command returned normally")
	}
	t.Logf("run error: %v", err)
	if g.ConsoleError() == nil {
		t.Fatalf("console shows no trouble after sysrq-c:\n%s", tail(g.Console(), 20))
	}
	for i := len(rec.cleanups) - 1; i >= 0; i-- {
		rec.cleanups[i]()
	}
	if len(rec.errors) == 0 {
		t.Fatal("helper did not fail the test after a kernel panic")
	}
	if !strings.Contains(rec.errors[0], "Kernel panic") && !strings.Contains(rec.errors[0], "Oops") && !strings.Contains(rec.errors[0], "BUG") {
		t.Fatalf("helper error does not name the crash: %q", rec.errors[0])
	}
	t.Logf("helper reported: %s", rec.errors[0])
}
