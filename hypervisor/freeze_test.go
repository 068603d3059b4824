package hypervisor

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as a freeze helper: with HVPATCH_FREEZE_HELPER
// set to "PID:TID,TID…" it freezes those threads, says FROZEN and waits to
// be killed. That is the daemon dying in the middle of a freeze.
func TestMain(m *testing.M) {
	if spec := os.Getenv("HVPATCH_FREEZE_HELPER"); spec != "" {
		os.Exit(freezeHelper(spec))
	}
	if n := os.Getenv("HVPATCH_THREADS_HELPER"); n != "" {
		os.Exit(threadsHelper(n))
	}
	if dom := os.Getenv("HVPATCH_GDB_HELPER"); dom != "" {
		os.Exit(gdbHelper(dom))
	}
	os.Exit(m.Run())
}

func freezeHelper(spec string) int {
	pidS, tidsS, _ := strings.Cut(spec, ":")
	pid, _ := strconv.Atoi(pidS)
	var tids []int
	for _, s := range strings.Split(tidsS, ",") {
		tid, _ := strconv.Atoi(s)
		tids = append(tids, tid)
	}
	f := newPtraceFreezer("helper", pid, tids)
	if _, err := f.Freeze(t0ctx()); err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	fmt.Println("FROZEN")
	select {}
}

// threadStates returns the /proc state letter of each thread.
func threadStates(t *testing.T, pid int, tids []int) string {
	var s []byte
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
		if err != nil {
			t.Fatal(err)
		}
		// "tid (comm) S ...": comm may hold spaces, so cut at the last ')'.
		i := strings.LastIndexByte(string(b), ')')
		s = append(s, b[i+2])
	}
	return string(s)
}

func allTraced(states string) bool {
	return strings.Trim(states, "t") == ""
}

func testFreezers(t *testing.T, lg *liveGuest) {
	ctx, d := lg.ctx, lg.d
	pid, _ := d.QEMUPid(ctx)
	tids, _ := d.VCPUThreads(ctx)
	mem, err := d.OpenPhysMem(ctx, "memfd")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	pf, err := d.PtraceFreezer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var windows []time.Duration
	for i := 0; i < 30; i++ {
		fz, err := pf.Freeze(ctx)
		if err != nil {
			t.Fatal(err)
		}
		states := threadStates(t, pid, tids)
		var b [8]byte
		rerr := mem.ReadPhys(0x1000, b[:]) // memory stays readable while frozen
		w, err := fz.Thaw()
		if err != nil || rerr != nil {
			t.Fatalf("thaw: %v, read while frozen: %v", err, rerr)
		}
		if !allTraced(states) {
			t.Fatalf("while frozen, vCPU threads %v are in states %q, want all 't' (traced)", tids, states)
		}
		windows = append(windows, w)
	}
	if _, err := fz0Thaw(); err == nil {
		t.Error("second Thaw succeeded")
	}
	// Thaw returns once the tracer detached; the threads leave the traced
	// state as the kernel wakes them.
	if s := waitUntraced(t, pid, tids); strings.Contains(s, "t") {
		t.Errorf("after thaw, vCPU threads are in states %q", s)
	}
	lg.g.MustRun("echo alive")
	slices.Sort(windows)
	t.Logf("ptrace freeze window over %d runs (%d vCPU threads): min %v median %v max %v",
		len(windows), len(tids), windows[0], windows[len(windows)/2], windows[len(windows)-1])

	sf := d.SuspendFreezer()
	fz, err := sf.Freeze(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := d.State(ctx)
	w, err := fz.Thaw()
	if err != nil || st != "paused" {
		t.Fatalf("suspend freezer: state while frozen %q (want paused), thaw error %v", st, err)
	}
	if st, _ := d.State(ctx); st != "running" {
		t.Errorf("after suspend thaw the domain is %q", st)
	}
	t.Logf("suspend freeze window: %v", w)
	lg.g.MustRun("echo alive")
}

// fz0Thaw thaws a freeze twice; the second must fail.
var fz0Thaw = func() (time.Duration, error) {
	fz := &ptraceFrozen{f: &ptraceFreezer{domain: "x"}, thawed: true}
	return fz.Thaw()
}

// testFreezeSurvivesKill: a process holding a ptrace freeze is SIGKILLed;
// the vCPUs must run again and the guest must answer.
func testFreezeSurvivesKill(t *testing.T, lg *liveGuest) {
	ctx, d := lg.ctx, lg.d
	pid, err := d.QEMUPid(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tids, err := d.VCPUThreads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var spec []string
	for _, tid := range tids {
		spec = append(spec, strconv.Itoa(tid))
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("HVPATCH_FREEZE_HELPER=%d:%s", pid, strings.Join(spec, ",")))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "FROZEN" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("freeze helper said %q", line)
	}
	frozen := threadStates(t, pid, tids)
	hold := 300 * time.Millisecond
	time.Sleep(hold)
	stillFrozen := threadStates(t, pid, tids)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if !allTraced(frozen) || !allTraced(stillFrozen) {
		t.Fatalf("helper's freeze did not hold: states %q then %q", frozen, stillFrozen)
	}
	after := waitUntraced(t, pid, tids)
	if strings.Contains(after, "t") {
		t.Fatalf("after the helper was killed the vCPU threads are still in states %q", after)
	}
	t0 := time.Now()
	out2, err := lg.g.RunTimeout("echo alive-after-kill", 20*time.Second)
	if err != nil || !strings.Contains(out2, "alive-after-kill") {
		t.Fatalf("guest does not answer after the freezing process was killed: %q, %v", out2, err)
	}
	if st, _ := d.State(ctx); st != "running" {
		t.Errorf("domain state after the kill: %q", st)
	}
	t.Logf("vCPU threads %v: %q while frozen, %q after SIGKILL; guest answered in %v", tids, frozen, after, time.Since(t0))
}

func t0ctx() context.Context { return context.Background() }

// waitUntraced polls the vCPU threads' states until none is traced, within
// a generous safety bound, and returns the last states seen.
func waitUntraced(t *testing.T, pid int, tids []int) string {
	var s string
	for deadline := time.Now().Add(safetyBound); ; time.Sleep(10 * time.Millisecond) {
		if s = threadStates(t, pid, tids); !strings.Contains(s, "t") || time.Now().After(deadline) {
			return s
		}
	}
}
