package daemon

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// TestAPIMatchesOpenAPI: against a real hvpatchd and guest, the answers of
// the main endpoints (and their errors) validate against the schemas of
// docs/openapi.json that hvpatchd serves at /openapi.json, and the Python
// example (examples/python, standard library only) lists the guest's tasks
// and reads a symbol's bytes as the API gives them.
func TestAPIMatchesOpenAPI(t *testing.T) {
	testguest.Need(t)
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is needed for examples/python: %v", err)
	}
	g := testguest.Start(t, testguest.Options{})
	td := newTestDaemon(t, "")
	td.start()

	raw := func(method, path string, body any) (int, []byte) {
		t.Helper()
		var rd io.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		}
		req, _ := http.NewRequest(method, "http://hvpatchd"+path, rd)
		resp, err := td.hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}

	// The served document is docs/openapi.json.
	code, served := raw("GET", "/openapi.json", nil)
	doc := loadOpenAPI(t)
	if code != 200 || !bytes.Equal(served, mustRead(t, "../docs/openapi.json")) {
		t.Fatalf("GET /openapi.json: %d, %d bytes; want docs/openapi.json", code, len(served))
	}

	// check requests path (documented as pattern) and validates the answer
	// against the documented schema of its status.
	check := func(method, pattern, query string, body any, wantCode int) []byte {
		t.Helper()
		path := strings.ReplaceAll(pattern, "{domain}", url.PathEscape(g.Name))
		if query != "" {
			path += "?" + query
		}
		code, b := raw(method, path, body)
		if code != wantCode {
			t.Fatalf("%s %s: %d %s, want %d", method, path, code, b, wantCode)
		}
		op := doc.operation(t, pattern, method)
		r, ok := op.Responses[fmt.Sprint(code)]
		if !ok {
			t.Fatalf("%s %s: status %d is not documented", method, pattern, code)
		}
		s := &schema{Ref: "#/components/schemas/Error"}
		if code == 200 {
			s = r.Content["application/json"].Schema
		}
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, b)
		}
		if err := doc.validate(method+" "+path, v, s); err != nil {
			t.Errorf("answer does not match docs/openapi.json: %v\n%.600s", err, b)
		}
		return b
	}
	check("GET", "/v1/health", "", nil, 200)
	check("GET", "/v1/domains", "", nil, 200)
	check("GET", "/v1/patches", "", nil, 200)
	check("GET", "/v1/domains/{domain}/info", "", nil, 200)
	check("GET", "/v1/domains/{domain}/sym", "q=version_proc_show", nil, 200)
	check("GET", "/v1/domains/{domain}/sym", "q=no_such_symbol_xyz", nil, 500)
	check("GET", "/v1/domains/{domain}/syms", "grep=^version_proc_", nil, 200)
	check("GET", "/v1/domains/{domain}/syms", "grep=(", nil, 500)
	readB := check("GET", "/v1/domains/{domain}/read", "target=version_proc_show&len=32", nil, 200)
	check("GET", "/v1/domains/{domain}/read", "target=version_proc_show&len=24&disasm=1", nil, 200)
	check("GET", "/v1/domains/{domain}/read", "target=version_proc_show&len=x", nil, 400)
	check("GET", "/v1/domains/{domain}/ps", "", nil, 200)
	check("GET", "/v1/domains/{domain}/lsmod", "", nil, 200)
	check("GET", "/v1/domains/{domain}/btf", "type=uts_namespace&type=seq_file", nil, 200)
	check("GET", "/v1/domains/{domain}/status", "", nil, 200)
	dryB := check("POST", "/v1/domains/{domain}/apply", "", ApplyRequest{Patch: versionKillSwitch(""), DryRun: true}, 200)
	var dry service.PatchResult
	json.Unmarshal(dryB, &dry)
	if dry.Plan == nil || len(dry.Plan.Edits) == 0 {
		t.Fatalf("dry run without a plan: %s", dryB)
	}
	check("GET", "/v1/domains/{domain}/mem", "phys="+dry.Plan.Edits[0].GPA+"&len=16", nil, 200)
	check("POST", "/v1/domains/{domain}/apply", "", map[string]any{"patch": "id: x", "bogus": 1}, 400)
	check("POST", "/v1/domains/{domain}/apply", "", ApplyRequest{Patch: versionKillSwitch("")}, 200)
	check("GET", "/v1/domains/{domain}/status", "", nil, 200)
	check("POST", "/v1/domains/{domain}/revert", "", RevertRequest{ID: "version-kill-switch"}, 200)
	if t.Failed() {
		return
	}

	// The Python example, against the same daemon.
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, filepath.Join(root, "examples", "python", "hvpatch_api.py"), "--socket", td.socket, g.Name, "version_proc_show", "32")
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LANG=C"}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("python3 examples/python/hvpatch_api.py: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	out := stdout.String()
	t.Logf("examples/python/hvpatch_api.py:\n%s", tailLines(out, 12))
	// Tasks: init and kthreadd as the guest names them, and every CPU's
	// idle task (pid 0).
	for pid, ppid := range map[int]int{1: 0, 2: 0} {
		comm := strings.TrimSpace(g.MustRun(fmt.Sprintf("cat /proc/%d/comm", pid)))
		re := regexp.MustCompile(fmt.Sprintf(`(?m)^\s+%d\s+%d\s+\S+\s+%s$`, pid, ppid, regexp.QuoteMeta(comm)))
		if !re.MatchString(out) {
			t.Errorf("python example: no task line for pid %d (%s):\n%s", pid, comm, out)
		}
	}
	if idle := regexp.MustCompile(`(?m)^\s+0\s+0\s`).FindAllString(out, -1); len(idle) != g.VCPUs {
		t.Errorf("python example: %d idle tasks listed, the guest has %d CPUs", len(idle), g.VCPUs)
	}
	// Bytes: the same as the API's read, as a hex dump.
	var rr service.ReadResult
	if err := json.Unmarshal(readB, &rr); err != nil || rr.Bytes == nil {
		t.Fatalf("read: %s %v", readB, err)
	}
	var want strings.Builder
	for i := 0; i < len(rr.Bytes.Hex); i += 2 {
		if i > 0 && i%32 != 0 {
			want.WriteByte(' ')
		}
		if i > 0 && i%32 == 0 {
			want.WriteByte('\n')
		}
		want.WriteString(rr.Bytes.Hex[i : i+2])
	}
	var got strings.Builder
	inDump := false
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "version_proc_show at "+rr.Bytes.Addr+", 32 bytes:") {
			inDump = true
			continue
		}
		if inDump && len(l) > 18 {
			if got.Len() > 0 {
				got.WriteByte('\n')
			}
			got.WriteString(l[18:])
		}
	}
	if !inDump || got.String() != want.String() {
		t.Errorf("python example's bytes of version_proc_show:\n%s\nthe API's:\n%s\n(output:\n%s)", got.String(), want.String(), out)
	}
}

// TestPythonExampleOffline runs examples/python/hvpatch_api.py against
// canned answers (valid against docs/openapi.json) on a unix socket: the
// script's requests and its parsing, without libvirt or a guest.
func TestPythonExampleOffline(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is needed for examples/python: %v", err)
	}
	doc := loadOpenAPI(t)
	answers := map[string]any{
		"/v1/domains/web 01/ps": service.Tasks{
			{PID: 0, PPID: 0, State: "R", Comm: "swapper/0", Task: "0xffffffff82a0c940", StackPointer: "0xffffffff82a03e48"},
			{PID: 0, PPID: 0, State: "R", Comm: "swapper/1", Task: "0xffff888003a40000", StackPointer: "0xffffc90000083ec8"},
			{PID: 2, PPID: 0, State: "S", Comm: "kthreadd", Task: "0xffff888003a81980", StackPointer: "0xffffc90000013e28"},
			{PID: 1, PPID: 0, State: "S", Comm: "init", Task: "0xffff888003a80000", StackPointer: "0xffffc9000000bd90"},
		},
		"/v1/domains/web 01/sym": service.SymLookup{Query: "version_proc_show", Symbols: []service.SymbolInfo{
			{Name: "version_proc_show", Addr: "0xffffffff8134c2a0", Type: "t", GapToNext: 80, Aliases: []string{}}}},
		"/v1/domains/web 01/read": service.ReadResult{Bytes: &service.Bytes{Source: "web 01", Addr: "0xffffffff8134c2a0", Length: 20,
			Hex: "f30f1efa0f1f440000415449c7c4a0d2e3818b47"}},
	}
	ops := map[string]string{"ps": "/v1/domains/{domain}/ps", "sym": "/v1/domains/{domain}/sym", "read": "/v1/domains/{domain}/read"}
	for p, v := range answers {
		b, _ := json.Marshal(v)
		var decoded any
		json.Unmarshal(b, &decoded)
		op := doc.operation(t, ops[p[strings.LastIndex(p, "/")+1:]], "GET")
		if err := doc.validate(p, decoded, op.Responses["200"].Content["application/json"].Schema); err != nil {
			t.Fatalf("canned answer: %v", err)
		}
	}
	var mu sync.Mutex
	var queries []string
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		queries = append(queries, r.Method+" "+r.URL.Path+"?"+r.URL.RawQuery)
		mu.Unlock()
		v, ok := answers[r.URL.Path]
		w.Header().Set("Content-Type", "application/json")
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(ErrorBody{Error: "no domain " + r.URL.Path})
			return
		}
		json.NewEncoder(w).Encode(v)
	})}
	go srv.Serve(l)
	defer srv.Close()
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(root, "examples", "python", "hvpatch_api.py")
	run := func(env []string, args ...string) (string, string, error) {
		cmd := exec.Command(python, append([]string{script}, args...)...)
		cmd.Env = append([]string{"PATH=/usr/bin:/bin", "LANG=C"}, env...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		return stdout.String(), stderr.String(), err
	}
	out, errOut, err := run([]string{"HVPATCH_DAEMON_SOCKET=" + sock}, "web 01", "version_proc_show", "20")
	if err != nil {
		t.Fatalf("hvpatch_api.py: %v\n%s%s", err, out, errOut)
	}
	want := `    PID    PPID ST COMM
      0       0 R  swapper/0
      0       0 R  swapper/1
      1       0 S  init
      2       0 S  kthreadd

version_proc_show at 0xffffffff8134c2a0, 20 bytes:
ffffffff8134c2a0  f3 0f 1e fa 0f 1f 44 00 00 41 54 49 c7 c4 a0 d2
ffffffff8134c2b0  e3 81 8b 47
`
	if out != want {
		t.Errorf("hvpatch_api.py printed:\n%s\nwant:\n%s", out, want)
	}
	wantQ := []string{"GET /v1/domains/web 01/ps?", "GET /v1/domains/web 01/sym?q=version_proc_show",
		"GET /v1/domains/web 01/read?target=version_proc_show&len=20"}
	mu.Lock()
	got := strings.Join(queries, "\n")
	mu.Unlock()
	if got != strings.Join(wantQ, "\n") {
		t.Errorf("requests:\n%s\nwant:\n%s", got, strings.Join(wantQ, "\n"))
	}
	// An error answer: the message on stderr, exit 1.
	out, errOut, err = run(nil, "--socket", sock, "nosuch")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(errOut, "HTTP 404: no domain /v1/domains/nosuch/ps") {
		t.Errorf("unknown domain: %v, stdout %q, stderr %q", err, out, errOut)
	}
}
