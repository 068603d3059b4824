package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

// runEnv runs the CLI with exactly env (plus the test switch) and no
// --socket, so the connection comes from the URI and the environment.
func runEnv(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append([]string{"HVPATCH_CLI_UNDER_TEST=1", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + t.TempDir(), "LANG=C",
		"HVPATCH_DAEMON_SOCKET=" + filepath.Join(t.TempDir(), "none.sock")}, env...)
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

func TestVersion(t *testing.T) {
	out, _, code := runEnv(t, nil, "--version")
	if code != 0 || !strings.HasPrefix(out, "hvpatch ") || !strings.Contains(out, "(") {
		t.Errorf("--version: exit %d, %q", code, out)
	}
}

func TestEveryCommandHasExamples(t *testing.T) {
	forEachCommand(newRootCmd(), func(c *cobra.Command) {
		if strings.TrimSpace(c.Example) == "" {
			t.Errorf("%s: no Examples section", c.CommandPath())
		}
		if !strings.Contains(c.Example, "hvpatch") {
			t.Errorf("%s: examples do not show a command line: %q", c.CommandPath(), c.Example)
		}
	})
}

func TestUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"read", "web01"}, []string{"hvpatch read:", "Usage:\n  hvpatch read DOMAIN", "Examples:", "--disasm"}},
		{[]string{"info"}, []string{"--dump FILE", "Usage:", "hvpatch info --dump web01.core"}},
		{[]string{"info", "--dump", "x.core", "web01"}, []string{"no DOMAIN", "Usage:"}},
		{[]string{"ps", "--no-such-flag"}, []string{"unknown flag: --no-such-flag", "Usage:\n  hvpatch ps"}},
		{[]string{"mem", "read", "web01", "16"}, []string{"--phys ADDR is required", "Usage:"}},
		{[]string{"domains", "extra"}, []string{"hvpatch domains:", "Usage:"}},
	} {
		out, stderr, code := runEnv(t, nil, c.args...)
		if code != exitUsage || out != "" {
			t.Errorf("%v: exit %d (want %d), stdout %q", c.args, code, exitUsage, out)
		}
		for _, w := range c.want {
			if !strings.Contains(stderr, w) {
				t.Errorf("%v: stderr lacks %q:\n%s", c.args, w, stderr)
			}
		}
		// The same error as one JSON object, with the same exit status.
		_, jerr, jcode := runEnv(t, nil, append([]string{"--json"}, c.args...)...)
		var e service.ErrorJSON
		dec := json.NewDecoder(strings.NewReader(jerr))
		if err := dec.Decode(&e); err != nil || dec.More() || jcode != code || e.Kind != service.KindUsage || e.Error == "" {
			t.Errorf("--json %v: exit %d, stderr %q (%v)", c.args, jcode, jerr, err)
		}
	}
}

// TestJSONErrors: a failure that is not a usage error keeps exit status 1
// and names the domain and kind; the connection comes from
// LIBVIRT_DEFAULT_URI or -c, the socket from the URI.
func TestJSONErrors(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "libvirt-sock")
	env := []string{"LIBVIRT_DEFAULT_URI=qemu+unix:///system?socket=" + sock}
	_, stderr, code := runEnv(t, env, "--json", "--standalone", "info", "web01")
	var e service.ErrorJSON
	if err := json.Unmarshal([]byte(stderr), &e); err != nil || code != exitError {
		t.Fatalf("exit %d, stderr %q: %v", code, stderr, err)
	}
	if e.Domain != "web01" || e.Kind != service.KindConnection || !strings.Contains(e.Error, sock) {
		t.Errorf("LIBVIRT_DEFAULT_URI socket not used, or error misdescribed: %+v", e)
	}
	_, stderr, code = runEnv(t, env, "--standalone", "info", "web01")
	if code != exitError || !strings.HasPrefix(stderr, "hvpatch: ") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("text error: exit %d, %q", code, stderr)
	}
	other := filepath.Join(t.TempDir(), "other-sock")
	_, stderr, _ = runEnv(t, env, "--standalone", "-c", "qemu+unix:///system?socket="+other, "domains")
	if !strings.Contains(stderr, other) {
		t.Errorf("-c URI does not choose the socket over LIBVIRT_DEFAULT_URI: %q", stderr)
	}
	_, stderr, _ = runEnv(t, env, "--standalone", "-c", "qemu+ssh://root@elsewhere/system", "domains")
	if !strings.Contains(stderr, "not supported") {
		t.Errorf("remote URI: %q", stderr)
	}
}
