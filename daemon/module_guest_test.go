package daemon

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// dummyCarrierLock is a patch on dummy.ko and the kernel image:
// dummy_change_carrier returns -EPERM, so writing
// /sys/class/net/dummy0/carrier fails, and version_proc_show returns 0, so
// /proc/version reads empty.
func dummyCarrierLock(domain string) string {
	return fmt.Sprintf(`id: dummy-carrier-lock
domains: [%q]
match: {release: ["*"]}
edits:
  - {kind: return, function: dummy_change_carrier, module: dummy, value: -1}
  - {kind: return, function: version_proc_show, value: 0}
`, domain)
}

// loadUntilPatched runs in the guest: insmod dummy.ko, note the uptime,
// bring dummy0 up, then write the carrier until that fails (the patch took
// effect) or 120 s pass; it returns the milliseconds from the end of the
// insmod to the first failed write (uptime has 10 ms steps).
func loadUntilPatched(t *testing.T, g *testguest.Guest) time.Duration {
	t.Helper()
	script := `m=/lib/modules/$(uname -r)/dummy.ko
insmod $m || exit 1
read a _ </proc/uptime
ip link set dummy0 up
n=0
while echo 0 >/sys/class/net/dummy0/carrier 2>/dev/null; do
	echo 1 >/sys/class/net/dummy0/carrier
	n=$((n+1))
	if [ $((n % 10)) -eq 0 ]; then read c _ </proc/uptime; [ ${c%.*} -gt $((${a%.*}+120)) ] && break; fi
done
read b _ </proc/uptime
echo "$a $b $n"`
	out, err := g.RunTimeout(script, 3*time.Minute)
	if err != nil {
		t.Fatalf("guest load loop: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n") // the shell reports the failed write first
	f := strings.Fields(lines[len(lines)-1])
	if len(f) != 3 {
		t.Fatalf("guest load loop printed %q", out)
	}
	a, err1 := strconv.ParseFloat(f[0], 64)
	b, err2 := strconv.ParseFloat(f[1], 64)
	if err1 != nil || err2 != nil || b-a >= 120 {
		t.Fatalf("the patch did not take effect within 120 s of the insmod: %q", out)
	}
	t.Logf("guest: %s writes of the carrier succeeded before the patch took effect", f[2])
	return time.Duration((b - a) * float64(time.Second))
}

// TestDaemonLateModulePatch: a patch on a function of dummy.ko (and one of
// the kernel image) is declared while dummy is not loaded: hvpatchd
// applies the kernel edit at once and reports the patch waiting for the
// module. insmod in the guest: the patch takes
// effect (the guest's own writes of the carrier start failing), and the
// delay from the end of the insmod is measured in the guest and logged.
// rmmod: the daemon sees the module go (the patch waits again, the journal
// entry is "module gone") and the kernel's edit stays. insmod again:
// patched again, the kernel's edit carried over. A revert through the API
// with the module gone restores the kernel function. Pass/fail bounds are
// generous safety bounds only.
// Every Debian series: 6.1 and 6.12 (bookworm), and the extra kernels
// 5.10, 6.12+deb13 and 7.x.
func TestDaemonLateModulePatch(t *testing.T) {
	testguest.Need(t)
	ks, err := testguest.AllKernels()
	if err != nil {
		t.Fatal(err)
	}
	only := os.Getenv("HVPATCH_TEST_SERIES")
	for _, k := range ks {
		series := k.Series
		if only != "" && series != only {
			continue
		}
		t.Run(series, func(t *testing.T) {
			g := testguest.Start(t, testguest.Options{Kernel: k})
			td := newTestDaemon(t, "")
			const file = "dummy.yaml"
			os.WriteFile(filepath.Join(td.patchDir, file), []byte(dummyCarrierLock(g.Name)), 0o644)
			td.start()
			waitDeclared(t, td, g.Name, file, "waiting", 60*time.Second)
			st, err := td.status(g.Name)
			if err != nil || len(st.Declared) != 1 || !strings.Contains(st.Declared[0].Reason, "waiting for module dummy") {
				t.Fatalf("status while dummy is not loaded: %+v %v", st, err)
			}
			// The kernel part goes in before the module loads.
			if !strings.Contains(st.Declared[0].Reason, "kernel edits are applied") {
				t.Fatalf("status while dummy is not loaded: reason %q, want the kernel edits applied", st.Declared[0].Reason)
			}
			if got := procVersionLen(t, g); got != "0" {
				t.Fatalf("before the module loads, the kernel edit is not in place: /proc/version has %s bytes", got)
			}
			if n, err := td.metric(`hvpatch_domains{state="waiting"}`); err != nil || n != 1 {
				t.Errorf("waiting domains gauge %v %v", n, err)
			}

			for round := 1; round <= 2; round++ {
				d := loadUntilPatched(t, g)
				t.Logf("%s: round %d: the patch took effect %v after insmod dummy returned (measured in the guest)", series, round, d.Round(time.Millisecond))
				waitDeclared(t, td, g.Name, file, "applied", 30*time.Second)
				if out, err := g.Run("echo 0 >/sys/class/net/dummy0/carrier"); err == nil || !strings.Contains(out, "not permitted") {
					t.Fatalf("round %d: writing the carrier after the apply: %q %v", round, out, err)
				}
				if got := procVersionLen(t, g); got != "0" {
					t.Fatalf("round %d: the kernel edit is not in place: /proc/version has %s bytes", round, got)
				}
				g.MustRun("rmmod dummy")
				t0 := time.Now()
				waitDeclared(t, td, g.Name, file, "waiting", 60*time.Second)
				t.Logf("%s: round %d: unload seen %v after rmmod returned", series, round, time.Since(t0).Round(time.Millisecond))
				st, err := td.status(g.Name)
				if err != nil {
					t.Fatal(err)
				}
				gone := false
				for _, p := range st.Patches {
					gone = gone || p.ID == "dummy-carrier-lock" && p.Memory == "module gone" && p.Journal == "module gone"
				}
				if !gone {
					t.Fatalf("round %d: journal after rmmod: %+v", round, st.Patches)
				}
				if got := procVersionLen(t, g); got != "0" {
					t.Fatalf("round %d: the kernel edit went with the module: /proc/version has %s bytes", round, got)
				}
			}
			// Undeclared first (the file removed: it stays applied), so
			// that the daemon does not put the kernel part back after
			// the revert.
			os.Remove(filepath.Join(td.patchDir, file))
			for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
				st, err := td.status(g.Name)
				if err == nil && len(st.Declared) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("patch file removed, still declared: %+v %v", st.Declared, err)
				}
			}
			var res service.PatchResult
			if err := td.do(http.MethodPost, "/domains/"+g.Name+"/revert", service.RevertRequest{ID: "dummy-carrier-lock"}, &res); err != nil {
				t.Fatalf("revert with the module gone: %v", err)
			}
			if got := procVersionLen(t, g); got == "0" {
				t.Fatalf("revert with the module gone (%s) left the kernel function patched", res.Message)
			}
			t.Logf("%s: revert with the module gone: %s", series, res.Message)
			if n, err := td.metric(`hvpatch_module_events_total{event="appeared"}`); err != nil || n < 2 {
				t.Errorf("appeared events %v %v, want 2", n, err)
			}
			if n, err := td.metric(`hvpatch_module_events_total{event="gone"}`); err != nil || n < 2 {
				t.Errorf("gone events %v %v, want 2", n, err)
			}
			// The guest never reboots here: a reboot seen is a false one
			// (on 7.x a vCPU's CR3 with bit 12 set and PTI off was once
			// taken for a new kernel, right after each gdbstub session).
			if strings.Contains(td.log(), "guest rebooted") {
				t.Errorf("hvpatchd saw a reboot that did not happen")
			}
			for _, l := range strings.Split(td.log(), "\n") {
				if strings.Contains(l, "since_module_signal") || os.Getenv("HVPATCH_TEST_DAEMONLOG") != "" {
					t.Logf("hvpatchd: %s", l)
				}
			}
			if err := g.ConsoleError(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
