package hypervisor

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var (
	fentryNOP   = []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
	endbr64     = []byte{0xf3, 0x0f, 0x1e, 0xfa}
	returnZero5 = []byte{0x31, 0xc0, 0xc3, 0x66, 0x90} // xor eax,eax; ret; 2-byte nop
)

// guestSymbol reads one address from the guest's /proc/kallsyms.
func guestSymbol(t *testing.T, lg *liveGuest, name string) uint64 {
	out := lg.g.MustRun(fmt.Sprintf("grep ' %s$' /proc/kallsyms", name))
	f := strings.Fields(out)
	if len(f) < 3 {
		t.Fatalf("kallsyms has no %s: %q", name, out)
	}
	a, err := strconv.ParseUint(f[0], 16, 64)
	if err != nil || a == 0 {
		t.Fatalf("kallsyms line %q (kptr_restrict?)", out)
	}
	return a
}

var gpaLine = regexp.MustCompile(`gpa: (0x[0-9a-f]+)`)

// gva2gpa translates with the monitor (current vCPU's page tables); a vCPU
// in user mode under PTI does not map kernel text, so retry a few times.
func gva2gpa(t *testing.T, lg *liveGuest, va uint64) uint64 {
	for i := 0; i < 20; i++ {
		out, err := lg.d.HMP(lg.ctx, fmt.Sprintf("gva2gpa %#x", va))
		if err != nil {
			t.Fatal(err)
		}
		if m := gpaLine.FindStringSubmatch(out); m != nil {
			gpa, _ := strconv.ParseUint(m[1], 0, 64)
			return gpa
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("gva2gpa %#x failed", va)
	return 0
}

func testCodeWriters(t *testing.T, lg *liveGuest) {
	ctx, d := lg.ctx, lg.d
	mem, err := d.OpenPhysMem(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	auto, err := d.NewCodeWriter(ctx, "", mem)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"tcg": "gdbstub", "kvm": "direct+ptrace"}[lg.g.Accel]
	if auto.Name() != want {
		t.Errorf("automatic writer on %s is %s, want %s", lg.g.Accel, auto.Name(), want)
	}
	if _, err := d.NewCodeWriter(ctx, "direct+ptrace", nil); err == nil {
		t.Error("direct writer without PhysMem accepted")
	}

	fn := guestSymbol(t, lg, "version_proc_show")
	version := strings.TrimSpace(lg.g.MustRun("cat /proc/version"))
	if !strings.HasPrefix(version, "Linux version") {
		t.Fatalf("/proc/version: %q", version)
	}
	gw, err := d.NewCodeWriter(ctx, "gdbstub", nil)
	if err != nil {
		t.Fatal(err)
	}
	site := fn
	var gpa uint64
	edit := func(w CodeWriter, expect, data []byte) FreezeReport {
		t.Helper()
		s, err := w.Stop(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cur := make([]byte, len(expect))
		rerr := s.Read(site, gpa, cur)
		var werr error
		if rerr == nil && bytes.Equal(cur, expect) {
			werr = s.Write(site, gpa, data)
		}
		back := make([]byte, len(data))
		berr := s.Read(site, gpa, back)
		rep, err := s.Resume()
		if err != nil || rerr != nil || werr != nil || berr != nil {
			t.Fatalf("%s: resume %v, read %v, write %v, read back %v", w.Name(), err, rerr, werr, berr)
		}
		if !bytes.Equal(cur, expect) {
			t.Fatalf("%s: bytes at %#x are %x, expected %x; nothing written", w.Name(), site, cur, expect)
		}
		if !bytes.Equal(back, data) {
			t.Fatalf("%s: wrote %x at %#x, read back %x", w.Name(), data, site, back)
		}
		return rep
	}
	// Find the fentry NOP: at +4 after endbr64 (6.12, IBT), else at +0.
	s, err := gw.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 9)
	err = s.Read(fn, 0, head)
	if _, rerr := s.Resume(); err != nil || rerr != nil {
		t.Fatalf("reading %#x: %v, %v", fn, err, rerr)
	}
	if bytes.HasPrefix(head, endbr64) {
		site += 4
	}
	gpa = gva2gpa(t, lg, site)

	rep := edit(gw, fentryNOP, returnZero5)
	out, err := lg.g.Run("cat /proc/version | wc -c")
	if err != nil || strings.TrimSpace(out) != "0" {
		edit(gw, returnZero5, fentryNOP)
		t.Fatalf("after writing %x at version_proc_show+%d, /proc/version has %q bytes (want 0), %v", returnZero5, site-fn, out, err)
	}
	rep2 := edit(gw, returnZero5, fentryNOP)
	if got := strings.TrimSpace(lg.g.MustRun("cat /proc/version")); got != version {
		t.Fatalf("after restoring, /proc/version is %q, want %q", got, version)
	}
	if rep.Method != "gdbstub" || rep.VCPUs != lg.g.VCPUs || rep.Window <= 0 || rep.Window > 5*time.Second {
		t.Errorf("gdbstub report %+v", rep)
	}
	t.Logf("gdbstub: edit at %#x (version_proc_show+%d, gpa %#x) emptied /proc/version, restore brought it back; windows %v, %v",
		site, site-fn, gpa, rep.Window, rep2.Window)
	// QEMU must run the VM once the writer's own check is done; libvirt's
	// view follows from QEMU's RESUME event, which a busy libvirtd handles
	// late, so it gets a bound rather than one look.
	if s, ok := gw.(interface{ Settle() error }); !ok {
		t.Errorf("gdbstub writer %T has no Settle", gw)
	} else if err := s.Settle(); err != nil {
		t.Errorf("gdbstub writer: %v", err)
	}
	if st, err := d.RunStatus(ctx); err != nil || st != "running" {
		t.Errorf("after the gdbstub writer QEMU reports the VM %q (%v)", st, err)
	}
	var st string
	lag := time.Now()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, _ = d.State(ctx); st == "running" {
			break
		}
	}
	if st != "running" {
		t.Errorf("30 s after the gdbstub writer libvirt reports the domain %q", st)
	}
	t.Logf("libvirt reported the domain running %v after the check", time.Since(lag).Round(time.Millisecond))

	// Direct writers: under TCG, running code may not see their writes, so
	// check what they do promise: reads and writes of guest RAM with all
	// vCPUs stopped. The write is the same bytes (no change for the guest),
	// and a scratch write to a zero page in low memory is seen by xp.
	scratch := findZeroPage(t, mem)
	for _, kind := range []string{"direct+ptrace", "direct+suspend"} {
		w, err := d.NewCodeWriter(ctx, kind, mem)
		if err != nil {
			t.Fatal(err)
		}
		rep := edit(w, fentryNOP, fentryNOP)
		wantMethod := strings.TrimPrefix(kind, "direct+")
		if w.Name() != kind || rep.Method != wantMethod || rep.VCPUs != lg.g.VCPUs || rep.Window <= 0 {
			t.Errorf("%s: name %s, report %+v", kind, w.Name(), rep)
		}
		pattern := []byte("hvpatch-" + kind)
		s, err := w.Stop(ctx)
		if err != nil {
			t.Fatal(err)
		}
		werr := s.Write(0, scratch, pattern)
		if _, err := s.Resume(); err != nil || werr != nil {
			t.Fatal(err, werr)
		}
		seen := xp(t, lg, scratch, len(pattern))
		if err := mem.WritePhys(scratch, make([]byte, len(pattern))); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(seen, pattern) {
			t.Errorf("%s: wrote %q at gpa %#x, xp shows %q", kind, pattern, scratch, seen)
		}
		t.Logf("%s: window %v", kind, rep.Window)
	}
	lg.g.MustRun("echo alive")
}

// findZeroPage finds an all-zero page in 0x21000–0x98000: Linux reserves
// the first MiB and leaves those pages unused.
func findZeroPage(t *testing.T, mem PhysMem) uint64 {
	page := make([]byte, 4096)
	for a := uint64(0x90000); a >= 0x21000; a -= 0x1000 {
		if err := mem.ReadPhys(a, page); err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(page, make([]byte, 4096)) {
			return a
		}
	}
	t.Fatal("no zero page in low memory")
	return 0
}

// gdbHelper is the test binary re-run as a process that stops a domain
// through the gdbstub writer and then waits to be killed.
func gdbHelper(domain string) int {
	ctx := context.Background()
	c, err := Connect(ctx, Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	d, err := c.LookupDomain(ctx, domain)
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	w, err := d.NewCodeWriter(ctx, "gdbstub", nil)
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	if _, err := w.Stop(ctx); err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	fmt.Println("STOPPED")
	select {}
}

// testGdbstubSurvivesKill: a process killed while it holds the guest
// stopped through the gdbstub must not leave the guest paused. Repeated:
// QEMU sometimes stays paused after a plain detach, which the guard must
// then undo.
func testGdbstubSurvivesKill(t *testing.T, lg *liveGuest) {
	for i := 0; i < 6; i++ {
		gdbstubKillOnce(t, lg)
	}
}

func gdbstubKillOnce(t *testing.T, lg *liveGuest) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "HVPATCH_GDB_HELPER="+lg.d.Name())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "STOPPED" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("gdbstub helper said %q", line)
	}
	// libvirt learns of the stop from a QEMU event: give it a moment.
	st, _ := lg.d.State(lg.ctx)
	for t0 := time.Now(); st != "paused" && time.Since(t0) < 3*time.Second; {
		time.Sleep(20 * time.Millisecond)
		st, _ = lg.d.State(lg.ctx)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if st != "paused" {
		t.Fatalf("while the helper held the gdbstub, the domain was %q, want paused", st)
	}
	t0 := time.Now()
	for st != "running" && time.Since(t0) < 10*time.Second {
		time.Sleep(20 * time.Millisecond)
		st, _ = lg.d.State(lg.ctx)
	}
	if st != "running" {
		t.Fatalf("10 s after the helper was killed the domain is still %q", st)
	}
	if rs, err := lg.d.RunStatus(lg.ctx); err != nil || rs != "running" {
		t.Fatalf("after the helper was killed QEMU reports %q (%v)", rs, err)
	}
	lg.g.MustRun("echo alive")
	t.Logf("helper killed mid-session: domain running again after %v", time.Since(t0))
}
