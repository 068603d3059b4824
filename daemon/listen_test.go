package daemon

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestMain doubles as a tiny client: with HVPATCH_TEST_DIAL set, the test
// binary (re-run as another user) connects to that socket and reports.
func TestMain(m *testing.M) {
	if path := os.Getenv("HVPATCH_TEST_DIAL"); path != "" {
		c, err := net.Dial("unix", path)
		if err != nil {
			fmt.Println("dial failed:", err)
			os.Exit(3)
		}
		c.Close()
		fmt.Println("connected")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const nobody = 65534

// dialAs runs the test binary as uid/gid and returns what it printed.
func dialAs(t *testing.T, uid, gid uint32, path string) (string, error) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The go test binary lives in a root-only directory: copy it somewhere
	// the other user can execute it.
	dir, err := os.MkdirTemp("", "hvpatchd-dial-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "dial")
	data, _ := os.ReadFile(self)
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"HVPATCH_TEST_DIAL=" + path}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func serve(t *testing.T, l net.Listener) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
}

func socketDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "hvpatchd-sock-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755) // let other users reach the socket; its own mode decides
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestSocketRefusesOtherUsers(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test needs root: it creates a socket owned by root and connects as nobody")
	}
	path := filepath.Join(socketDir(t), "api.sock")
	l, err := ListenUnix(path, 0o660, "root", "root")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, l)
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o660 || st.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Fatalf("socket mode %v, err %v", st.Mode(), err)
	}
	if out, err := dialAs(t, nobody, nobody, path); err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("nobody connected to a 0660 root:root socket: %q %v", out, err)
	}
	// The same user is let in when the socket's group is theirs.
	l.Close()
	l, err = ListenUnix(path, 0o660, "root", fmt.Sprint(nobody))
	if err != nil {
		t.Fatal(err)
	}
	serve(t, l)
	if out, err := dialAs(t, nobody, nobody, path); err != nil || out != "connected" {
		t.Fatalf("member of the socket's group refused: %q %v", out, err)
	}
}

func TestSocketTakeover(t *testing.T) {
	path := filepath.Join(socketDir(t), "api.sock")
	l, err := ListenUnix(path, 0o600, "0", "0")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, l)
	if _, err := ListenUnix(path, 0o600, "0", "0"); err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Fatalf("second daemon on a live socket: %v", err)
	}
	l.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket not removed on close: %v", err)
	}
	// A stale socket file (daemon killed) is replaced.
	stale, _ := net.Listen("unix", path)
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err = ListenUnix(path, 0o600, "0", "0")
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l.Close()
	os.WriteFile(path, []byte("x"), 0o644)
	if _, err := ListenUnix(path, 0o600, "0", "0"); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file at the socket path: %v", err)
	}
}

func TestBadOwner(t *testing.T) {
	_, err := ListenUnix(filepath.Join(t.TempDir(), "s"), 0o660, "no-such-user-hvpatch", "root")
	if err == nil || !strings.Contains(err.Error(), "api.owner") {
		t.Fatalf("unknown owner: %v", err)
	}
}
