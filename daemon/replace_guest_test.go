package daemon

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
)

const replaceMarker = "(version_proc_show replaced by hvpatch)"

// replaceBundle writes a patch bundle into dir: version-replace.yaml,
// whose replace edit links obj (copied next to it as
// objects/version_proc_show.o) and pins its SHA-256.
func replaceBundle(t *testing.T, dir, obj string) string {
	t.Helper()
	data := mustRead(t, obj)
	os.MkdirAll(filepath.Join(dir, "objects"), 0o755)
	if err := os.WriteFile(filepath.Join(dir, "objects", "version_proc_show.o"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	file := filepath.Join(dir, "version-replace.yaml")
	text := `id: version-replace
match: {release: ["6.1.*", "6.12.*"]}
objects:
  objects/version_proc_show.o: ` + hex.EncodeToString(sum[:]) + `
edits:
  - {kind: replace, function: version_proc_show, object: objects/version_proc_show.o, with: hvpatch_version_proc_show}
`
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// guestState is what a refused apply must leave as it was: the replaced
// function's first bytes, the first MiB of guest RAM (where the code area
// lives) and the code area's entries.
func guestState(t *testing.T, g *testguest.Guest) (string, []codearea.Entry) {
	t.Helper()
	l := testkernel.Attach(t, g)
	addr, err := l.Kernel.SymbolAddr("version_proc_show")
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 16)
	if err := l.Kernel.AS.ReadVirt(addr, head); err != nil {
		t.Fatal(err)
	}
	low := make([]byte, 1<<20)
	if err := l.Mem.ReadPhys(0, low); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(low)
	area, err := codearea.Find(l.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(head) + "/" + hex.EncodeToString(sum[:]), area.Entries()
}

// TestDaemonReplaceSigned: through hvpatchd (require_signed), a replace
// edit's object travels with the apply; a swapped object is refused with
// guest memory unchanged; the correctly signed bundle applies, reverts and
// is released (code area empty), the same as with the CLI standalone.
func TestDaemonReplaceSigned(t *testing.T) {
	g := testguest.Start(t, testguest.Options{})
	objs := testkernel.BuildReplacements(t, g.Kernel, map[string]string{
		"other": "int hvpatch_version_proc_show(void *m, void *v) { return 0; }\n",
	})
	td := newTestDaemon(t, "signing: {require_signed: true, trusted_keys: [KEYDIR]}\n")
	if _, errOut, code := cli(t, nil, "keygen", "--dir", td.keyDir(), "ops"); code != 0 {
		t.Fatalf("hvpatch keygen: %s", errOut)
	}
	td.start()
	key := filepath.Join(td.keyDir(), "ops.key")
	viaDaemon := []string{"--daemon-socket", td.socket}

	bundle := replaceBundle(t, t.TempDir(), filepath.Join(objs, "version_proc_show.o"))
	if _, errOut, code := cli(t, nil, "sign", "--key", key, bundle); code != 0 {
		t.Fatalf("hvpatch sign: %s", errOut)
	}
	origVersion := g.MustRun("cat /proc/version")
	before, entries := guestState(t, g)
	if len(entries) != 0 {
		t.Fatalf("code area not empty at the start: %+v", entries)
	}

	// The same signed patch file, with another object in its place.
	os.WriteFile(filepath.Join(filepath.Dir(bundle), "objects", "version_proc_show.o"), mustRead(t, filepath.Join(objs, "other.o")), 0o644)
	_, errOut, code := cli(t, nil, append(viaDaemon, "apply", g.Name, bundle)...)
	if code == 0 || !strings.Contains(errOut, "refused") || !strings.Contains(errOut, "SHA-256") {
		t.Fatalf("swapped object: exit %d, stderr %q; want a refusal naming the SHA-256", code, errOut)
	}
	if after, entries := guestState(t, g); after != before || len(entries) != 0 {
		t.Fatalf("swapped object refused, but guest memory changed (%s -> %s, area %+v)", before, after, entries)
	}
	if got := g.MustRun("cat /proc/version"); got != origVersion {
		t.Fatalf("/proc/version after the refusal: %q", got)
	}
	replaceBundle(t, filepath.Dir(bundle), filepath.Join(objs, "version_proc_show.o"))

	run := func(mode string, args ...string) string {
		t.Helper()
		out, errOut, code := cli(t, nil, args...)
		if code != 0 {
			t.Fatalf("%s: hvpatch %s: exit %d\n%s%s", mode, strings.Join(args, " "), code, out, errOut)
		}
		return out
	}
	// Through the daemon, then the CLI on its own (its own journal
	// directory): the same outcome.
	t.Setenv("HVPATCH_STATE_DIR", t.TempDir())
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"hvpatchd", viaDaemon},
		{"standalone", []string{"--standalone"}},
	} {
		run(mode.name, append(mode.args, "apply", g.Name, bundle)...)
		if got := g.MustRun("cat /proc/version"); !strings.Contains(got, replaceMarker) {
			t.Fatalf("%s: applied, but /proc/version reads %q", mode.name, got)
		}
		if _, entries := guestState(t, g); len(entries) != 1 {
			t.Fatalf("%s: applied: code area %+v, want one entry", mode.name, entries)
		}
		out := run(mode.name, append(mode.args, "revert", g.Name, "version-replace")...)
		if strings.Contains(out, "releasing") || strings.Contains(out, "refusing") {
			t.Errorf("%s: revert says %q", mode.name, out)
		}
		if got := g.MustRun("cat /proc/version"); got != origVersion {
			t.Fatalf("%s: reverted, but /proc/version reads %q", mode.name, got)
		}
		if _, entries := guestState(t, g); len(entries) != 0 {
			t.Fatalf("%s: reverted, but the code area still holds %+v (not released)", mode.name, entries)
		}
		st := run(mode.name, append(mode.args, "status", g.Name)...)
		if strings.Contains(st, "version-replace") {
			t.Errorf("%s: status after the revert still lists the patch:\n%s", mode.name, st)
		}
	}
	if after, _ := guestState(t, g); strings.Split(after, "/")[0] != strings.Split(before, "/")[0] {
		t.Errorf("version_proc_show's entry after both cycles: %s, was %s", after, before)
	}
	if err := g.ConsoleError(); err != nil {
		t.Fatal(err)
	}
}
