package ksource

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestChangedFiles(t *testing.T) {
	diff, err := os.ReadFile("testdata/ok.diff")
	if err != nil {
		t.Fatal(err)
	}
	got, err := ChangedFiles(diff)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"fs/proc/demo.c", "kernel/demo2.c"}; !slices.Equal(got, want) {
		t.Errorf("ChangedFiles = %q, want %q", got, want)
	}

	del := "diff --git a/x/gone.c b/x/gone.c\ndeleted file mode 100644\n--- a/x/gone.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-int x;\n"
	if got, err := ChangedFiles([]byte(del)); err != nil || !slices.Equal(got, []string{"x/gone.c"}) {
		t.Errorf("ChangedFiles(deletion) = %q, %v", got, err)
	}
	if _, err := ChangedFiles([]byte("--- a/../etc/passwd\n+++ b/../etc/passwd\n")); err == nil {
		t.Error("a path leaving the tree was accepted")
	}
	if _, err := ChangedFiles([]byte("hello\n")); err == nil {
		t.Error("a text without diff headers was accepted")
	}
}

// snapshot reads every file under dir, to check that the tree stays as it was.
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	m := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		m[p] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestPatchedFiles(t *testing.T) {
	// Keep patch's scratch copies inside the repository.
	scratch, err := os.MkdirTemp("testdata", "scratch-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(scratch)
	abs, _ := filepath.Abs(scratch)
	t.Setenv("TMPDIR", abs)
	tree := &Tree{Dir: "testdata/tree"}
	before := snapshot(t, tree.Dir)
	diff, _ := os.ReadFile("testdata/ok.diff")
	got, err := tree.PatchedFiles(context.Background(), diff)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("PatchedFiles gave %d files, want 2", len(got))
	}
	orig, _ := tree.ReadFile("fs/proc/demo.c")
	want := bytes.Replace(orig, []byte("return y + 1;"), []byte("return y + 2;"), 1)
	if !bytes.Equal(got["fs/proc/demo.c"], want) {
		t.Errorf("patched demo.c:\n%s", got["fs/proc/demo.c"])
	}
	if !bytes.Contains(got["kernel/demo2.c"], []byte("return 43;")) {
		t.Errorf("patched demo2.c:\n%s", got["kernel/demo2.c"])
	}

	bad, _ := os.ReadFile("testdata/bad.diff")
	_, err = tree.PatchedFiles(context.Background(), bad)
	if err == nil {
		t.Fatal("a diff that does not apply was accepted")
	}
	if msg := err.Error(); !strings.Contains(msg, "kernel/demo2.c") || !strings.Contains(msg, "Hunk #1 FAILED") {
		t.Errorf("error does not name file and hunk: %v", err)
	}

	after := snapshot(t, tree.Dir)
	if len(after) != len(before) {
		t.Errorf("tree has %d files after patching, %d before", len(after), len(before))
	}
	for p, b := range before {
		if !bytes.Equal(after[p], b) {
			t.Errorf("%s changed in the tree", p)
		}
	}
}
