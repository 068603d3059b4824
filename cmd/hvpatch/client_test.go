package main

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The CLI sends the objects a patch's replace edits link, read relative to
// the patch file (not to the working directory), each once.
func TestPatchObjectsSent(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "fix"), 0o755)
	os.WriteFile(filepath.Join(dir, "fix", "a.o"), []byte("object a"), 0o644)
	os.WriteFile(filepath.Join(dir, "b.o"), []byte("object b"), 0o644)
	patch := `id: two-objects
match: {release: "6.1.*"}
edits:
  - {kind: replace, function: version_proc_show, object: fix/a.o, with: new_version}
  - {kind: replace, function: cmdline_proc_show, object: fix/a.o, with: new_cmdline}
  - {kind: replace, function: meminfo_proc_show, object: b.o, with: new_meminfo}
  - {kind: return, function: uptime_proc_show, value: 0}
`
	file := filepath.Join(dir, "p.yaml")
	os.WriteFile(file, []byte(patch), 0o644)
	t.Chdir(t.TempDir())
	got, err := patchObjects(file, []byte(patch))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"fix/a.o": "object a", "b.o": "object b"}
	if len(got) != len(want) {
		t.Fatalf("sent %v, want %v", got, want)
	}
	for k, v := range want {
		b, err := base64.StdEncoding.DecodeString(got[k])
		if err != nil || string(b) != v {
			t.Errorf("object %s: %q %v, want %q", k, b, err, v)
		}
	}
	// A patch without replace edits sends none; a missing object is an
	// error naming it; a patch that does not parse is left to the daemon.
	if got, err := patchObjects(file, []byte("id: x\nmatch: {release: \"6.1.*\"}\nedits:\n  - {kind: return, function: f, value: 0}\n")); got != nil || err != nil {
		t.Errorf("no replace edits: %v %v", got, err)
	}
	os.Remove(filepath.Join(dir, "b.o"))
	if _, err := patchObjects(file, []byte(patch)); err == nil || !strings.Contains(err.Error(), "b.o") {
		t.Errorf("missing object: %v", err)
	}
	if got, err := patchObjects(file, []byte("not: [a patch")); got != nil || err != nil {
		t.Errorf("unparsable patch: %v %v", got, err)
	}
}

// --writer takes the one vocabulary of writer names (hypervisor.ParseWriter)
// and is checked before anything is opened.
func TestWriterFlag(t *testing.T) {
	for _, c := range []struct{ writer, want string }{
		{"direct", "direct+ptrace or direct+suspend"},
		{"magic", "want one of auto, gdbstub, direct+ptrace, direct+suspend"},
	} {
		for _, cmd := range []string{"apply", "revert", "status"} {
			args := []string{cmd, "no-such-domain", "x", "--writer", c.writer}
			if cmd == "status" {
				args = []string{cmd, "no-such-domain", "--writer", c.writer}
			}
			_, stderr, code := runCLI(t, args...)
			if code == 0 || !strings.Contains(stderr, "--writer") || !strings.Contains(stderr, c.want) || strings.Contains(stderr, "no-such-domain") {
				t.Errorf("%s --writer %s: exit %d, stderr %q; want a refusal of the name before the domain is looked up", cmd, c.writer, code, stderr)
			}
		}
	}
	out, _, _ := runCLI(t, "apply", "--help")
	if !strings.Contains(out, "auto, gdbstub, direct+ptrace, direct+suspend") {
		t.Errorf("apply --help does not list the writer names:\n%s", out)
	}
}
