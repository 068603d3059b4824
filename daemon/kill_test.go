package daemon

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
)

// TestDaemonSIGKILL drives 50 apply/revert operations through the API of a
// real hvpatchd and SIGKILLs it at a random moment of each (seeded; the
// seed is logged, HVPATCH_KILL_SEED replays it). After every kill: no vCPU
// thread is left in ptrace stop, the domain runs (not left paused by a
// gdbstub session), and the restarted daemon's status matches guest memory
// read independently at the patched guest-physical address.
//
// Two writers: direct+ptrace (ptrace freeze + write to guest RAM; under TCG the
// guest may keep running translated old code, so only memory is compared)
// and auto (the gdbstub under TCG, which stops the VM through QEMU).
func TestDaemonSIGKILL(t *testing.T) {
	for _, writer := range []string{"direct+ptrace", "auto"} {
		t.Run(writer, func(t *testing.T) { testSIGKILL(t, writer) })
	}
}

func testSIGKILL(t *testing.T, writer string) {
	seed := time.Now().UnixNano()
	if s := os.Getenv("HVPATCH_KILL_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("HVPATCH_KILL_SEED=%q: %v", s, err)
		}
	}
	t.Logf("seed %d (HVPATCH_KILL_SEED=%d replays it)", seed, seed)
	rng := rand.New(rand.NewSource(seed))

	g := testguest.Start(t, testguest.Options{})
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hv, err := conn.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := hv.OpenPhysMem(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()

	td := newTestDaemon(t, "writer: "+writer+"\n")
	td.start()
	patch := versionKillSwitch("")
	// The plan says where the edit goes and what it writes.
	var dry service.PatchResult
	if err := td.do(http.MethodPost, "/domains/"+g.Name+"/apply", service.ApplyRequest{Patch: patch, DryRun: true}, &dry); err != nil {
		t.Fatal(err)
	}
	if dry.Plan == nil || len(dry.Plan.Edits) != 1 {
		t.Fatalf("dry run: %+v", dry)
	}
	e := dry.Plan.Edits[0]
	gpa, _ := strconv.ParseUint(e.GPA, 0, 64)
	oldB, _ := patcher.ParseHex(e.Old)
	newB, _ := patcher.ParseHex(e.New)
	readMem := func() []byte {
		b := make([]byte, len(oldB))
		if err := mem.ReadPhys(gpa, b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	if !bytes.Equal(readMem(), oldB) {
		t.Fatalf("memory at %#x holds % x before any apply, want % x", gpa, readMem(), oldB)
	}

	op := func() (string, error) {
		if bytes.Equal(readMem(), newB) {
			return "revert", td.do(http.MethodPost, "/domains/"+g.Name+"/revert", service.RevertRequest{ID: "version-kill-switch"}, nil)
		}
		return "apply", td.do(http.MethodPost, "/domains/"+g.Name+"/apply", service.ApplyRequest{Patch: patch}, nil)
	}
	// How long one operation takes on a restarted daemon after a status
	// (as in the loop below): kills are spread over that span.
	td.stop()
	td.start()
	if _, err := td.status(g.Name); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := op(); err != nil {
		t.Fatal(err)
	}
	span := time.Since(t0)
	t.Logf("one operation: %v", span.Round(100*time.Microsecond))

	pid, err := hv.QEMUPid(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tids, err := hv.VCPUThreads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	var maxPaused time.Duration
	for i := 0; i < 50; i++ {
		if td.cmd == nil {
			td.start()
		}
		delay := time.Duration(rng.Int63n(int64(span * 6 / 5)))
		res := make(chan error, 1)
		var kind string
		go func() {
			var err error
			kind, err = op()
			res <- err
		}()
		time.Sleep(delay)
		td.kill()
		killedAt := time.Now()
		opErr := <-res
		outcome := "completed"
		if opErr != nil {
			outcome = "interrupted"
		}
		counts[kind+" "+outcome]++

		// No vCPU thread stays in ptrace stop, the domain runs.
		for _, tid := range tids {
			// The kernel detaches a dead tracer's tracees as it reaps it:
			// poll, within a generous safety bound.
			for deadline := time.Now().Add(15 * time.Second); threadState(pid, tid) == "t"; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("op %d (%s, killed after %v): vCPU thread %d left in ptrace stop", i, kind, delay, tid)
				}
			}
		}
		// The restarted daemon resumes a guest its predecessor left
		// stopped through QEMU (a ptrace freeze ended with the process).
		td.start()
		// libvirt's state lags QEMU's (it follows monitor events): ask QEMU.
		running := false
		guardsLeft := 0
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			guardsLeft = len(processesOf(td.bin)) - 1 // the new daemon
			if qs, err := hv.HMP(ctx, "info status"); err == nil && strings.Contains(qs, "running") {
				running = true
				break
			}
		}
		if !running {
			ps, _ := exec.Command("sh", "-c", "ps -eo pid,ppid,stat,etimes,args | grep -e hvpatchd -e gdbstub | grep -v grep").CombinedOutput()
			t.Logf("processes (%d guards left):\n%s", guardsLeft, ps)
			qs, err := hv.HMP(ctx, "info status")
			t.Logf("QEMU: %q %v", qs, err)
			time.Sleep(5 * time.Second)
			st, _ := hv.State(ctx)
			qs, err = hv.HMP(ctx, "info status")
			t.Logf("5 s later: libvirt %s, QEMU: %q %v", st, qs, err)
			t.Fatalf("op %d (%s, killed after %v): domain left %s", i, kind, delay, st)
		}

		paused := time.Since(killedAt)
		if paused > maxPaused {
			maxPaused = paused
		}
		// The restarted daemon's status is what memory holds.
		st, err := td.status(g.Name)
		if err != nil {
			t.Fatalf("op %d: status after restart: %v", i, err)
		}
		got := readMem()
		// The first status after a restart reports what it corrected (a
		// pending entry whose write never happened); what it says memory
		// holds must be true, and the next status must be clean.
		for _, p := range st.Patches {
			if p.Difference != "" {
				counts["reconciled: "+p.Journal+"/"+p.Memory]++
				if p.Memory == "not applied" && bytes.Equal(got, newB) || p.Memory == "applied" && !bytes.Equal(got, newB) {
					t.Fatalf("op %d: status says memory %s, memory holds % x", i, p.Memory, got)
				}
			}
		}
		if st, err = td.status(g.Name); err != nil {
			t.Fatalf("op %d: status after restart: %v", i, err)
		}
		if err := statusMatches(st, gpa, got, oldB, newB); err != nil {
			t.Fatalf("op %d (%s %s, killed after %v): %v\nstatus %+v", i, kind, outcome, delay, err, st)
		}
	}
	t.Logf("50 operations killed at random moments: %v; longest until QEMU ran again (restart included): %v", counts, maxPaused.Round(time.Millisecond))
	if g.Accel == "tcg" && writer == "direct+ptrace" {
		return // TCG may run stale translations of directly written code
	}
	// The guest agrees with memory, and still runs its kernel fine.
	want := "0"
	if !bytes.Equal(readMem(), newB) {
		want = strings.TrimSpace(g.MustRun("cat /proc/version | wc -c"))
		if want == "0" {
			t.Fatal("memory holds the original bytes but /proc/version is empty")
		}
	} else if got := procVersionLen(t, g); got != want {
		t.Fatalf("memory holds the patch but /proc/version has %s bytes", got)
	}
}

func statusMatches(st service.Status, gpa uint64, mem, oldB, newB []byte) error {
	switch {
	case len(st.Patches) == 0:
		if !bytes.Equal(mem, oldB) {
			return fmt.Errorf("status lists no patch, memory at %#x holds % x (original % x)", gpa, mem, oldB)
		}
	case len(st.Patches) == 1:
		p := st.Patches[0]
		if p.Journal != "applied" || p.Memory != "applied" || len(p.Changes) != 1 {
			return fmt.Errorf("patch %s: journal %s, memory %s", p.ID, p.Journal, p.Memory)
		}
		if c := p.Changes[0]; c.GPA != fmt.Sprintf("%#x", gpa) || c.New != patcher.FormatHex(newB) {
			return fmt.Errorf("status edit at %s writes %s; expected %#x and % x", c.GPA, c.New, gpa, newB)
		}
		if !bytes.Equal(mem, newB) {
			return fmt.Errorf("status says applied, memory at %#x holds % x", gpa, mem)
		}
	default:
		return fmt.Errorf("%d patches in status", len(st.Patches))
	}
	return nil
}

// threadState is the state letter of a thread ("t" is ptrace stop).
func threadState(pid, tid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	if err != nil {
		return "?"
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return "?"
	}
	return s[i+2 : i+3]
}

// processesOf lists the pids running the executable bin (a killed daemon's
// gdbstub guard is the daemon binary re-run).
func processesOf(bin string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if exe, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && exe == bin {
			pids = append(pids, pid)
		}
	}
	return pids
}
