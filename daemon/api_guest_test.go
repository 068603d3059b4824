package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// TestDaemonAccessAndSigning: the API socket refuses a user without access
// to it; with require_signed, a signed patch applies, and a tampered or
// unsigned one is refused with guest memory unchanged, whether sent to the
// API or declared in the patch directory.
func TestDaemonAccessAndSigning(t *testing.T) {
	g := testguest.Start(t, testguest.Options{})
	td := newTestDaemon(t, "signing: {require_signed: true, trusted_keys: [KEYDIR]}\n")
	if out, errOut, code := cli(t, nil, "keygen", "--dir", td.keyDir(), "ops"); code != 0 || !strings.Contains(out, "ops.pub") {
		t.Fatalf("hvpatch keygen: %d %q %q", code, out, errOut)
	}
	td.start()

	// Access: root gets in, nobody is refused (and told so, not silently
	// sent standalone).
	out, errOut, code := cli(t, nil, "--daemon-socket", td.socket, "domains")
	if code != 0 || !strings.Contains(out, g.Name) {
		t.Fatalf("root through the daemon: %d %q %q", code, out, errOut)
	}
	out, errOut, code = cli(t, &syscall.Credential{Uid: 65534, Gid: 65534}, "--daemon-socket", td.socket, "domains")
	if code == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("nobody through the daemon: exit %d, stdout %q, stderr %q; want permission denied", code, out, errOut)
	}

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

	dir := t.TempDir()
	file := filepath.Join(dir, "kill.yaml")
	os.WriteFile(file, []byte(versionKillSwitch("")), 0o644)
	if _, errOut, code := cli(t, nil, "sign", "--key", filepath.Join(td.keyDir(), "ops.key"), file); code != 0 {
		t.Fatalf("hvpatch sign: %s", errOut)
	}
	signed := service.ApplyRequest{Patch: string(mustRead(t, file)), Signature: string(mustRead(t, file+".sig")), File: "kill.yaml"}

	// Where the edit goes, from a (signed) dry run.
	dryReq := signed
	dryReq.DryRun = true
	var dry service.PatchResult
	if err := td.do(http.MethodPost, "/domains/"+g.Name+"/apply", dryReq, &dry); err != nil {
		t.Fatal(err)
	}
	gpa, _ := strconv.ParseUint(dry.Plan.Edits[0].GPA, 0, 64)
	site := func() []byte {
		b := make([]byte, 5)
		if err := mem.ReadPhys(gpa, b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	orig := site()

	refused := func(what string, req service.ApplyRequest, want string) {
		t.Helper()
		err := td.do(http.MethodPost, "/domains/"+g.Name+"/apply", req, nil)
		var ae *apiError
		if !errors.As(err, &ae) || ae.code != http.StatusForbidden || !strings.Contains(ae.msg, want) {
			t.Fatalf("%s: %v; want 403 %q", what, err, want)
		}
		if got := site(); !bytes.Equal(got, orig) {
			t.Fatalf("%s: refused, but memory changed to % x", what, got)
		}
	}
	tampered := signed
	tampered.Patch = strings.Replace(signed.Patch, "value: 0", "value: 1", 1)
	refused("tampered", tampered, "does not match")
	unsigned := signed
	unsigned.Signature = ""
	refused("unsigned", unsigned, "not signed")
	if got := procVersionLen(t, g); got == "0" {
		t.Fatal("/proc/version empty after refused patches")
	}

	var res service.PatchResult
	if err := td.do(http.MethodPost, "/domains/"+g.Name+"/apply", signed, &res); err != nil {
		t.Fatalf("signed patch: %v", err)
	}
	if got := procVersionLen(t, g); got != "0" || bytes.Equal(site(), orig) {
		t.Fatalf("signed patch applied (%s) but /proc/version has %s bytes", res.Message, got)
	}
	if err := td.do(http.MethodPost, "/domains/"+g.Name+"/revert", service.RevertRequest{ID: "version-kill-switch"}, &res); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(site(), orig) {
		t.Fatal("revert left the patch in memory")
	}

	// Declared files: a tampered one is refused and reported, then the
	// same file correctly signed is applied.
	decl := filepath.Join(td.patchDir, "kill.yaml")
	os.WriteFile(decl, []byte(versionKillSwitch(g.Name)), 0o644)
	cli(t, nil, "sign", "--key", filepath.Join(td.keyDir(), "ops.key"), decl)
	os.WriteFile(decl, []byte(strings.Replace(versionKillSwitch(g.Name), "test patch", "tampered", 1)), 0o644)
	var files []PatchFile
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if err := td.get("/patches", &files); err != nil {
			t.Fatal(err)
		}
		if len(files) == 1 && strings.Contains(files[0].Error, "does not match") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tampered declared file not reported: %+v", files)
		}
	}
	// Two more reconcile passes of the domain: the second started after
	// the catalog held the tampered file.
	waitPasses(t, td, 2)
	if got := site(); !bytes.Equal(got, orig) {
		t.Fatalf("tampered declared file changed memory to % x", got)
	}
	if n, err := td.metric(`hvpatch_failures_total{reason="signature"}`); err != nil || n < 3 {
		t.Errorf("signature failures metric %v %v, want at least 3", n, err)
	}
	cli(t, nil, "sign", "--key", filepath.Join(td.keyDir(), "ops.key"), decl)
	waitDeclared(t, td, g.Name, "kill.yaml", "applied", 15*time.Second)
	if got := procVersionLen(t, g); got != "0" {
		t.Fatalf("signed declared patch applied, /proc/version has %s bytes", got)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCLIWithAndWithoutDaemon: every introspection command prints the same
// through the daemon as standalone (text and JSON), and the CLI falls back
// to standalone when no daemon serves at the socket.
func TestCLIWithAndWithoutDaemon(t *testing.T) {
	g := testguest.Start(t, testguest.Options{})
	td := newTestDaemon(t, "")
	td.start()
	// Standalone runs share the daemon's journal directory (cli passes
	// HVPATCH_STATE_DIR on), so patch status reads the same journal.
	t.Setenv("HVPATCH_STATE_DIR", td.stateDir)
	patchFile := filepath.Join(t.TempDir(), "kill.yaml")
	if err := os.WriteFile(patchFile, []byte(versionKillSwitch("")), 0o644); err != nil {
		t.Fatal(err)
	}
	symOut, _, _ := cli(t, nil, "--standalone", "--json", "sym", g.Name, "version_proc_show")
	var syms service.SymLookup
	if err := json.Unmarshal([]byte(symOut), &syms); err != nil || len(syms.Symbols) != 1 {
		t.Fatalf("sym: %q %v", symOut, err)
	}
	addr, _ := strconv.ParseUint(syms.Symbols[0].Addr, 0, 64)
	dry := "" // guest-physical address of the symbol, for mem read
	{
		var r service.PatchResult
		if err := td.do(http.MethodPost, "/domains/"+g.Name+"/apply", service.ApplyRequest{Patch: versionKillSwitch(""), DryRun: true}, &r); err != nil {
			t.Fatal(err)
		}
		dry = r.Plan.Edits[0].GPA
	}
	cases := [][]string{
		{"info", g.Name},
		{"sym", g.Name, "version_proc_show"},
		{"sym", g.Name, "0x" + strconv.FormatUint(addr+3, 16)},
		{"sym", g.Name, "no_such_symbol_xyz"},
		{"syms", g.Name, "--grep", "^version_proc_"},
		{"read", g.Name, "version_proc_show", "32"},
		{"read", g.Name, "version_proc_show", "7", "--disasm"},
		{"read", g.Name, "no_such_symbol_xyz", "8"},
		{"mem", "read", g.Name, "--phys", dry, "64"},
		{"lsmod", g.Name},
		{"ps", g.Name},
		{"domains"},
		{"apply", g.Name, patchFile, "--dry-run"},
		{"status", g.Name},
		{"revert", g.Name, "never-applied"},
	}
	compare := func(mode []string) {
		t.Helper()
		for _, c := range cases {
			for _, asJSON := range []bool{false, true} {
				args := c
				if asJSON {
					args = append([]string{"--json"}, c...)
				}
				var d, s [3]string
				for try := 0; try < 3; try++ { // the guest's processes (ps) can change between two runs
					o1, e1, c1 := cli(t, nil, append(mode, args...)...)
					o2, e2, c2 := cli(t, nil, append([]string{"--standalone"}, args...)...)
					if c[0] == "domains" { // other VMs on the host come and go: compare the test's own
						o1, o2 = onlyDomain(t, o1, g.Name, asJSON), onlyDomain(t, o2, g.Name, asJSON)
					}
					d = [3]string{normalize(o1), e1, strconv.Itoa(c1)}
					s = [3]string{normalize(o2), e2, strconv.Itoa(c2)}
					if d == s {
						break
					}
				}
				if d != s {
					t.Errorf("hvpatch %s %v:\n%v:\n%s\nstderr %q exit %s\nstandalone:\n%s\nstderr %q exit %s",
						strings.Join(args, " "), mode, mode, d[0], d[1], d[2], s[0], s[1], s[2])
				}
				if d[0] == "" && d[1] == "" {
					t.Errorf("hvpatch %v printed nothing", args)
				}
			}
		}
	}
	// Through the daemon: the libvirt socket given to the CLI does not
	// even exist, so only the daemon can answer.
	out, errOut, code := cli(t, nil, "--daemon-socket", td.socket, "--socket", "/nonexistent", "lsmod", g.Name)
	if code != 0 || !strings.Contains(out, "MODULE") {
		t.Fatalf("lsmod through the daemon with no libvirt access: %d %q %q", code, out, errOut)
	}
	compare([]string{"--daemon-socket", td.socket})
	// Without a daemon at the socket: standalone, same output.
	td.stop()
	if _, err := os.Stat(td.socket); !os.IsNotExist(err) {
		t.Fatalf("socket left after a graceful stop: %v", err)
	}
	cases = cases[:4]
	compare([]string{"--daemon-socket", td.socket})
}

// onlyDomain keeps, of hvpatch domains output, the header and the rows of
// one domain.
func onlyDomain(t *testing.T, out, name string, asJSON bool) string {
	t.Helper()
	if asJSON {
		var doms []map[string]any
		if err := json.Unmarshal([]byte(out), &doms); err != nil {
			return out // compared as it is: the difference shows
		}
		var keep []map[string]any
		for _, d := range doms {
			if d["name"] == name {
				keep = append(keep, d)
			}
		}
		b, _ := json.Marshal(keep)
		return string(b)
	}
	lines := strings.Split(out, "\n")
	keep := lines[:min(1, len(lines))]
	for _, l := range lines[1:] {
		if slices.Contains(strings.Fields(l), name) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// waitPasses waits until the daemon's reconcile passes went up by n (a
// safety bound of a minute).
func waitPasses(t *testing.T, td *testDaemon, n float64) {
	t.Helper()
	p0, err := td.metric("hvpatch_reconcile_passes_total")
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if p, err := td.metric("hvpatch_reconcile_passes_total"); err == nil && p >= p0+n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %v reconcile passes within a minute", n)
		}
	}
}

// normalize drops what differs between two attaches of the same kernel:
// how long attaching took.
func normalize(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "Attach time:") || strings.Contains(l, `"attach_ms"`) || strings.Contains(l, `"timings"`) {
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}
