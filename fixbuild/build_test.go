package fixbuild

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/symbols"
)

func diffOf(path string) []byte {
	return []byte("--- a/" + path + "\n+++ b/" + path + "\n@@ -1,1 +1,1 @@\n-old\n+new\n")
}

// Changes hvpatch never builds are refused before any package is fetched
// or any guest memory read.
func TestBuildRefusesNonC(t *testing.T) {
	g := Guest{Banner: "Linux version 6.1.0-47-cloud-amd64 (x) #1 SMP PREEMPT_DYNAMIC Debian 6.1.170-3 (2026-01-01)",
		Symbols: symbols.NewTable(nil), Read: func(uint64, []byte) error { t.Fatal("guest memory read"); return nil }}
	for path, want := range map[string]string{
		"include/linux/pipe_fs_i.h": "changes a header",
		"arch/x86/entry/entry_64.S": "assembly",
		"net/core/Makefile":         "not C source",
		"Documentation/foo/bar.rst": "not C source",
	} {
		_, err := Build(context.Background(), g, diffOf(path), Options{OutDir: t.TempDir(), Cache: "/nonexistent"})
		var r *RefusedError
		if !errors.As(err, &r) || r.File != path || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want a refusal naming the file and %q", path, err, want)
		}
	}
	if _, err := Build(context.Background(), g, []byte("not a diff"), Options{}); err == nil {
		t.Error("a file with no diff in it was accepted")
	}
}

func TestDefaultID(t *testing.T) {
	for _, c := range []struct{ diff, name, want string }{
		{"", "/tmp/CVE-2026-52928.diff", "cve-2026-52928"},
		{"", "0001-af_unix-Reject-SIOCATMARK.patch", "0001-af_unix-reject-siocatmark"},
		{"From x\nSubject: [PATCH 6.1] tcp: restrict SO_ATTACH_FILTER\n\n--- a/x.c\n", "-", "tcp-restrict-so_attach_filter"},
		{"--- a/x.c\n", "", "fix"},
	} {
		if got := defaultID([]byte(c.diff), c.name); got != c.want {
			t.Errorf("defaultID(%q, %q) = %q, want %q", c.diff, c.name, got, c.want)
		}
	}
	if got := describe([]byte("Subject: [PATCH] ipc: limit next_id\n"), "x.diff"); got != "ipc: limit next_id" {
		t.Errorf("describe: %q", got)
	}
}

// The generated patch file must be one hvpatch apply accepts: every field
// the patcher knows, objects pinned by hash, sympos where names repeat.
func TestPatchTextParses(t *testing.T) {
	g := Guest{Release: "6.1.0-47-cloud-amd64", BuildID: "4f61d8f6405b1c6eed15a7a3e2e27067394202d3"}
	text := patchText("fix-1", `a "quoted" description`, g,
		map[string]string{"net-core-sock.o": strings.Repeat("ab", 32)},
		[]editLine{{function: "sk_setsockopt", object: "net-core-sock.o"}, {function: "show_stat", sympos: 2, object: "net-core-sock.o"}})
	p, err := patcher.ParsePatch([]byte(text))
	if err != nil {
		t.Fatalf("%v\n%s", err, text)
	}
	if p.ID != "fix-1" || len(p.Edits) != 2 || p.Edits[1].Sympos == nil || *p.Edits[1].Sympos != 2 || p.Edits[0].With != "sk_setsockopt" || p.Description != `a "quoted" description` {
		t.Fatalf("parsed %+v", p)
	}
	if !p.StackConsistency() {
		t.Fatal("bundles from hvpatch build must ask for the stack consistency check")
	}
	if p.Match.BuildIDs[0] != g.BuildID || p.Match.Release[0] != g.Release {
		t.Fatalf("match %+v", p.Match)
	}
}
