package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad flags, arguments and settings stop hvpatchd with status 2 and a
// message naming the problem (an unknown flag once exited silently).
func TestParseArgs(t *testing.T) {
	good := filepath.Join(t.TempDir(), "hvpatchd.yaml")
	os.WriteFile(good, []byte("{}\n"), 0o644)
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("reconcile: {interval: 30}\n"), 0o644)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--no-such-flag"}, 2, "unknown flag: --no-such-flag"},
		{[]string{"-x"}, 2, "unknown shorthand flag"},
		{[]string{"--config", good, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"--config", bad}, 2, "needs a unit"},
		{[]string{"--config", good, "--writer", "magic"}, 2, "writer"},
		{[]string{"--help"}, 0, "Usage: hvpatchd"},
		{[]string{"--config", good}, 0, ""},
	} {
		var stderr bytes.Buffer
		cfg, code := parseArgs(c.args, &stderr)
		if code != c.code || !strings.Contains(stderr.String(), c.want) || (c.want == "" && stderr.Len() > 0) {
			t.Errorf("hvpatchd %v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr.String(), c.code, c.want)
		}
		if (cfg != nil) != (c.code == 0 && c.want == "") {
			t.Errorf("hvpatchd %v: config %v", c.args, cfg)
		}
	}
}

func TestVersionFlag(t *testing.T) {
	var out, stderr bytes.Buffer
	old := stdout
	stdout = &out
	defer func() { stdout = old }()
	cfg, code := parseArgs([]string{"--version"}, &stderr)
	if cfg != nil || code != 0 || !strings.HasPrefix(out.String(), "hvpatchd ") || stderr.Len() != 0 {
		t.Errorf("--version: cfg %v, exit %d, stdout %q, stderr %q", cfg, code, out.String(), stderr.String())
	}
}
