package ksource

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestRestoreJournalAfterKill: a process killed while compiling leaves its
// journal, the replaced source and the object its compiler went on to
// write. The next Compile's restore puts the source back and removes the
// object and its .cmd; an object that was there before is left alone.
func TestRestoreJournalAfterKill(t *testing.T) {
	for _, had := range []bool{false, true} {
		dir := t.TempDir()
		tr := &Tree{Dir: dir}
		os.MkdirAll(filepath.Join(dir, "kernel"), 0o755)
		src, obj, cmd := filepath.Join(dir, "kernel/sys.c"), filepath.Join(dir, "kernel/sys.o"), filepath.Join(dir, "kernel/.sys.o.cmd")
		mtime := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
		js, _ := json.Marshal(journal{Rel: "kernel/sys.c", Content: []byte("original\n"), ModTime: mtime, Object: "kernel/sys.o", HadObject: had})
		os.WriteFile(filepath.Join(dir, journalFile), js, 0o644)
		os.WriteFile(src, []byte("int cancelled;\n"), 0o644)
		os.WriteFile(obj, []byte("ELF"), 0o644)
		os.WriteFile(cmd, []byte("cmd"), 0o644)
		if err := tr.restoreJournal(); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(src); string(b) != "original\n" {
			t.Errorf("had=%v: source is %q after the restore", had, b)
		}
		if fi, err := os.Stat(src); err != nil || !fi.ModTime().Equal(mtime) {
			t.Errorf("had=%v: source modification time not restored: %v", had, err)
		}
		_, oerr := os.Stat(obj)
		_, cerr := os.Stat(cmd)
		if had != (oerr == nil) || had != (cerr == nil) {
			t.Errorf("had=%v: object present %v, .cmd present %v", had, oerr == nil, cerr == nil)
		}
		if _, err := os.Stat(filepath.Join(dir, journalFile)); !os.IsNotExist(err) {
			t.Errorf("had=%v: journal left: %v", had, err)
		}
	}
	// A journal of a compile that replaced nothing restores no source.
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "fs"), 0o755)
	os.WriteFile(filepath.Join(dir, "fs/a.c"), []byte("kept\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "fs/a.o"), []byte("ELF"), 0o644)
	js, _ := json.Marshal(journal{Rel: "fs/a.c", Object: "fs/a.o"})
	os.WriteFile(filepath.Join(dir, journalFile), js, 0o644)
	if err := (&Tree{Dir: dir}).restoreJournal(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "fs/a.c")); string(b) != "kept\n" {
		t.Errorf("source without replaced content became %q", b)
	}
	if _, err := os.Stat(filepath.Join(dir, "fs/a.o")); !os.IsNotExist(err) {
		t.Errorf("object of the killed compile left: %v", err)
	}
}
