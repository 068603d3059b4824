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
