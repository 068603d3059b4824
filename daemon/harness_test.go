package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// The guest tests run the real binaries: hvpatchd as a subprocess (so it
// can be killed) and hvpatch as the CLI, both built once per test run into
// a directory other users can execute from.
var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func binaries(t *testing.T) (hvpatchd, hvpatch string) {
	t.Helper()
	buildOnce.Do(func() {
		root, err := testguest.RepoRoot()
		if err != nil {
			buildErr = err
			return
		}
		if binDir, buildErr = os.MkdirTemp("", "hvpatchd-bin-"); buildErr != nil {
			return
		}
		os.Chmod(binDir, 0o755)
		for _, pkg := range []string{"hvpatchd", "hvpatch"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, pkg), "./cmd/"+pkg)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build ./cmd/%s: %v\n%s", pkg, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "hvpatchd"), filepath.Join(binDir, "hvpatch")
}

// testDaemon is one hvpatchd process and the directories it uses.
type testDaemon struct {
	t                          *testing.T
	bin                        string
	dir                        string
	socket, patchDir, stateDir string
	config                     string
	logPath                    string
	cmd                        *exec.Cmd
	exited                     chan struct{}
	started                    time.Time
	hc                         *http.Client
}

// newTestDaemon writes a configuration (extra YAML is appended, KEYDIR in
// it names the trusted key directory) but does not start the daemon.
func newTestDaemon(t *testing.T, extra string) *testDaemon {
	bin, _ := binaries(t)
	dir, err := os.MkdirTemp("", "hvpatchd-test-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755) // other users reach the socket; its own mode decides
	td := &testDaemon{t: t, bin: bin, dir: dir, socket: filepath.Join(dir, "hvpatchd.sock"),
		patchDir: filepath.Join(dir, "patches"), stateDir: filepath.Join(dir, "state"),
		config: filepath.Join(dir, "hvpatchd.yaml"), logPath: filepath.Join(dir, "hvpatchd.log")}
	os.MkdirAll(td.patchDir, 0o755)
	extra = strings.ReplaceAll(extra, "KEYDIR", filepath.Join(dir, "keys"))
	cfg := fmt.Sprintf(`libvirt: {socket: %s}
state_dir: %s
patch_dir: %s
api: {socket: %s, mode: "0660", owner: root, group: root}
reconcile: {interval: 2s, max_backoff: 20s}
log: {format: json, level: debug}
%s`, testguest.LibvirtSocket(), td.stateDir, td.patchDir, td.socket, extra)
	if !strings.Contains(extra, "signing:") {
		cfg += fmt.Sprintf("signing: {trusted_keys: [%s]}\n", td.keyDir())
	}
	os.MkdirAll(filepath.Join(dir, "keys"), 0o755)
	if err := os.WriteFile(td.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	path := td.socket
	td.hc = &http.Client{Timeout: 3 * time.Minute, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
	t.Cleanup(func() {
		td.stop()
		if t.Failed() {
			t.Logf("hvpatchd log (%s) tail:\n%s", td.logPath, tailLines(td.log(), 40))
			return
		}
		os.RemoveAll(dir)
	})
	return td
}

func (td *testDaemon) keyDir() string { return filepath.Join(td.dir, "keys") }

func (td *testDaemon) log() string {
	b, _ := os.ReadFile(td.logPath)
	return string(b)
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// start runs hvpatchd and waits until its API answers.
func (td *testDaemon) start() {
	td.t.Helper()
	logf, err := os.OpenFile(td.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		td.t.Fatal(err)
	}
	td.cmd = exec.Command(td.bin, "--config", td.config)
	td.cmd.Stdout, td.cmd.Stderr = logf, logf
	td.started = time.Now()
	if err := td.cmd.Start(); err != nil {
		td.t.Fatal(err)
	}
	logf.Close()
	td.exited = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(td.cmd, td.exited)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var h Health
		if err := td.get("/health", &h); err == nil && h.PID == td.cmd.Process.Pid {
			return
		}
		select {
		case <-td.exited:
			td.t.Fatalf("hvpatchd exited at start:\n%s", tailLines(td.log(), 20))
		default:
		}
		if time.Now().After(deadline) {
			td.t.Fatalf("hvpatchd API did not answer within 30 s:\n%s", tailLines(td.log(), 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends the daemon with SIGTERM (graceful) and waits.
func (td *testDaemon) stop() {
	if td.cmd == nil {
		return
	}
	td.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-td.exited:
	case <-time.After(30 * time.Second):
		td.t.Errorf("hvpatchd did not stop within 30 s of SIGTERM")
		td.cmd.Process.Kill()
		<-td.exited
	}
	td.cmd = nil
}

// kill ends the daemon with SIGKILL and waits for it to be gone.
func (td *testDaemon) kill() {
	td.cmd.Process.Kill()
	<-td.exited
	td.cmd = nil
}

func (td *testDaemon) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://hvpatchd"+APIVersion+path, rd)
	if err != nil {
		return err
	}
	resp, err := td.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var e service.ErrorBody
		json.Unmarshal(b, &e)
		return &apiError{resp.StatusCode, e.Error}
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

type apiError struct {
	code int
	msg  string
}

func (e *apiError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.code, e.msg) }

func (td *testDaemon) get(path string, out any) error { return td.do(http.MethodGet, path, nil, out) }

// status is the daemon's status of a domain.
func (td *testDaemon) status(dom string) (service.Status, error) {
	var st service.Status
	err := td.get("/domains/"+dom+"/status", &st)
	return st, err
}

// metric returns the value of one sample of the daemon's metrics.
func (td *testDaemon) metric(sample string) (float64, error) {
	req, _ := http.NewRequest(http.MethodGet, "http://hvpatchd/metrics", nil)
	resp, err := td.hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, sample+" ") {
			var v float64
			_, err := fmt.Sscan(strings.TrimPrefix(l, sample+" "), &v)
			return v, err
		}
	}
	return 0, fmt.Errorf("no metric sample %s", sample)
}

// cli runs the hvpatch binary with args; uid 0 unless asUser is set. The
// CLI gets a clean environment (HVPATCH_STATE_DIR is passed on when the
// test sets it) and a private daemon socket where nothing serves, so it
// never reaches an hvpatchd of the host; args may name another socket
// (--daemon-socket, the last one given wins).
func cli(t *testing.T, asUser *syscall.Credential, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	_, bin := binaries(t)
	noDaemon := filepath.Join(t.TempDir(), "no-hvpatchd.sock")
	cmd := exec.Command(bin, append([]string{"--socket", testguest.LibvirtSocket(), "--daemon-socket", noDaemon}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + t.TempDir(), "LANG=C"}
	if s := os.Getenv("HVPATCH_STATE_DIR"); s != "" {
		cmd.Env = append(cmd.Env, "HVPATCH_STATE_DIR="+s)
	}
	if asUser != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: asUser}
		cmd.Env = []string{"PATH=/usr/bin:/bin"}
	}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

// versionKillSwitch is the test patch: /proc/version reads empty.
func versionKillSwitch(domains string) string {
	s := "id: version-kill-switch\ndescription: test patch\n"
	if domains != "" {
		s += "domains: [\"" + domains + "\"]\n"
	}
	return s + "match: {release: [\"6.1.*\", \"6.12.*\"]}\nedits:\n  - {kind: return, function: version_proc_show, value: 0}\n"
}

// procVersionLen is the length of /proc/version as the guest reads it.
func procVersionLen(t *testing.T, g *testguest.Guest) string {
	t.Helper()
	return strings.TrimSpace(g.MustRun("wc -c </proc/version"))
}
