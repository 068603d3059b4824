package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/benchreport"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
)

// manyGuests runs hvpatchd (the real binary) beside 1, 4 and 8 guests of
// one kernel build (256 MiB, 1 vCPU each) and measures its memory, its CPU
// use while idle, and the time to apply one patch to all of them: declared
// in its patch directory, and through its API to all at once. The same is
// measured with kernel sharing off (HVPATCHD_SHARE_KERNELS=0) as the
// baseline.
func manyGuests(t *testing.T, ctx context.Context, r *benchreport.Report) {
	counts := []int{1, 4, 8}
	idle := 10 * time.Second
	if !full {
		counts, idle = []int{1, 2}, 2*time.Second
	}
	k, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "hvpatchd")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/hvpatchd").CombinedOutput(); err != nil {
		t.Fatalf("building hvpatchd: %v\n%s", err, out)
	}
	var gs []*testguest.Guest
	for range counts[len(counts)-1] {
		gs = append(gs, testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 1, MemoryMiB: 256}))
	}
	tab := &benchreport.Table{Name: "hvpatchd with many guests",
		About:   "hvpatchd (the binary) with N guests of one kernel build (" + k.Release + ", 256 MiB, 1 vCPU each). RSS is VmRSS after the declared patch is applied on all (guest RAM mapped in hvpatchd counts only for pages it touched); idle CPU is hvpatchd's user+system time over " + idle.String() + " afterwards with a 1 s reconcile interval; \"declared\" is from writing the patch file to all guests reporting it applied (includes up to one reconcile interval before hvpatchd reads its patch directory); \"API\" is one POST /apply per guest, all at once, until the last answers; attach is hvpatchd's own log of each guest's attach (libvirt lookups, memory map, registers, kernel), first guest / median of the others.",
		Columns: []string{"guests", "kernel sharing", "RSS at start", "RSS, all attached", "RSS per guest beyond the first", "idle CPU", "declared → applied on all", "API apply on all", "attach: first / others (median)"}}
	r.Tables = append(r.Tables, tab)
	rss := map[string]map[int]int64{}
	for _, share := range []bool{true, false} {
		label := map[bool]string{true: "on", false: "off (baseline)"}[share]
		rss[label] = map[int]int64{}
		ns := counts
		if !share {
			ns = []int{1, counts[len(counts)-1]}
		}
		for _, n := range ns {
			m := runDaemon(t, ctx, bin, gs[:n], share, idle)
			rss[label][n] = m.rss
			per := "—"
			if n > 1 {
				per = mib(float64(m.rss-rss[label][1]) / float64(n-1))
			}
			tab.Rows = append(tab.Rows, []string{strconv.Itoa(n), label, mib(float64(m.rss0)), mib(float64(m.rss)), per,
				fmt.Sprintf("%.2f%% of a core", m.cpu*100), benchreport.FormatDuration(m.declared), benchreport.FormatDuration(m.api), m.attach})
		}
	}
	n := counts[len(counts)-1]
	on := float64(rss["on"][n]-rss["on"][1]) / float64(n-1)
	off := float64(rss["off (baseline)"][n]-rss["off (baseline)"][1]) / float64(n-1)
	ratio := ""
	if on > 0 {
		ratio = fmt.Sprintf("%.1f× less than without sharing (%s per guest)", off/on, mib(off))
	}
	r.Targets = append(r.Targets, benchreport.Target{What: fmt.Sprintf("hvpatchd RSS per further guest of a seen build < 5 MB (%d guests)", n),
		Met: on < 5<<20, Detail: mib(on), VsBaseline: ratio})
}

func mib(b float64) string { return fmt.Sprintf("%.1f MiB", b/(1<<20)) }

type daemonRun struct {
	rss0, rss     int64
	cpu           float64 // cores
	declared, api time.Duration
	attach        string
}

var attachLog = regexp.MustCompile(`"msg":"guest attached".*?"attach":([0-9]+)`)

func runDaemon(t *testing.T, ctx context.Context, bin string, gs []*testguest.Guest, share bool, idle time.Duration) daemonRun {
	dir := t.TempDir()
	sock := filepath.Join(dir, "hvpatchd.sock")
	patches, state := filepath.Join(dir, "patches"), filepath.Join(dir, "state")
	os.MkdirAll(patches, 0o755)
	cfg := fmt.Sprintf("libvirt: {socket: %s}\nstate_dir: %s\npatch_dir: %s\napi: {socket: %s}\nreconcile: {interval: 1s, max_backoff: 10s}\nlog: {format: json, level: info}\n",
		testguest.LibvirtSocket(), state, patches, sock)
	os.WriteFile(filepath.Join(dir, "hvpatchd.yaml"), []byte(cfg), 0o644)
	logPath := filepath.Join(dir, "hvpatchd.log")
	logf, _ := os.Create(logPath)
	cmd := exec.Command(bin, "--config", filepath.Join(dir, "hvpatchd.yaml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if !share {
		cmd.Env = append(os.Environ(), "HVPATCHD_SHARE_KERNELS=0")
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	pid := cmd.Process.Pid
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		revertAll(t, ctx, gs, state)
	}()
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	call := func(method, path string, in, out any) error {
		var body bytes.Buffer
		if in != nil {
			json.NewEncoder(&body).Encode(in)
		}
		req, _ := http.NewRequest(method, "http://hvpatchd"+service.APIVersion+path, &body)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			var e service.ErrorBody
			json.NewDecoder(resp.Body).Decode(&e)
			return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, e.Error)
		}
		if out != nil {
			return json.NewDecoder(resp.Body).Decode(out)
		}
		return nil
	}
	for deadline := time.Now().Add(30 * time.Second); call("GET", "/health", nil, nil) != nil; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("hvpatchd did not answer:\n%s", b)
		}
	}
	time.Sleep(time.Second)
	var m daemonRun
	m.rss0 = vmRSS(t, pid)

	var names []string
	for _, g := range gs {
		names = append(names, `"`+g.Name+`"`)
	}
	decl := "id: bench-version-kill-switch\ndescription: bench\ndomains: [" + strings.Join(names, ", ") +
		"]\nmatch: {release: [\"6.1.*\"]}\nedits:\n  - {kind: return, function: version_proc_show, value: 0}\n"
	t0 := time.Now()
	os.WriteFile(filepath.Join(patches, "kill.yaml"), []byte(decl), 0o644)
	left := map[string]bool{}
	for _, g := range gs {
		left[g.Name] = true
	}
	for deadline := time.Now().Add(5 * time.Minute); len(left) > 0; time.Sleep(20 * time.Millisecond) {
		for name := range left {
			var st service.Status
			if call("GET", "/domains/"+name+"/status", nil, &st) == nil {
				for _, d := range st.Declared {
					if d.State == "applied" {
						delete(left, name)
					}
				}
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("declared patch not applied on %v within 5 min:\n%s", left, b)
		}
	}
	m.declared = time.Since(t0)
	time.Sleep(time.Second)
	m.rss = vmRSS(t, pid)
	c0 := cpuTime(t, pid)
	time.Sleep(idle)
	m.cpu = float64(cpuTime(t, pid)-c0) / float64(idle)

	api := "id: bench-cmdline-empty\ndescription: bench\nmatch: {release: [\"6.1.*\"]}\nedits:\n  - {kind: return, function: cmdline_proc_show, value: 0}\n"
	t0 = time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(gs))
	for i, g := range gs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = call("POST", "/domains/"+g.Name+"/apply", service.ApplyRequest{Patch: api, File: "cmdline.yaml"}, nil)
		}()
	}
	wg.Wait()
	m.api = time.Since(t0)
	for _, err := range errs {
		if err != nil {
			t.Fatalf("API apply: %v", err)
		}
	}
	b, _ := os.ReadFile(logPath)
	var attaches []time.Duration
	for _, l := range attachLog.FindAllStringSubmatch(string(b), -1) {
		if ns, err := strconv.ParseInt(l[1], 10, 64); err == nil {
			attaches = append(attaches, time.Duration(ns))
		}
	}
	m.attach = "—"
	if len(attaches) > 0 {
		m.attach = benchreport.FormatDuration(attaches[0])
		if rest := attaches[1:]; len(rest) > 0 {
			slices.Sort(rest)
			m.attach += " / " + benchreport.FormatDuration(rest[len(rest)/2])
		}
	}
	return m
}

// revertAll takes both benchmark patches off the guests (hvpatchd has
// stopped; its journal is in state).
func revertAll(t *testing.T, ctx context.Context, gs []*testguest.Guest, state string) {
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pt := &patcher.Patcher{State: patcher.StateDir{Dir: state}}
	for _, g := range gs {
		hv, err := conn.LookupDomain(ctx, g.Name)
		if err != nil {
			t.Fatal(err)
		}
		live, err := patcher.OpenLive(ctx, hv, "")
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"bench-cmdline-empty", "bench-version-kill-switch"} {
			if _, err := pt.Revert(ctx, live.Domain, id); err != nil && !strings.Contains(err.Error(), "not applied") && !strings.Contains(err.Error(), "no patch") {
				t.Logf("revert %s on %s: %v", id, g.Name, err)
			}
		}
		live.Close()
	}
}

func vmRSS(t *testing.T, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}

// cpuTime is the process's user+system time (clock ticks of 10 ms).
func cpuTime(t *testing.T, pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+s) * 10 * time.Millisecond
}
