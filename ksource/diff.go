package ksource

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ChangedFiles lists the files a unified diff (git format, applied with
// -p1) changes, in the order the diff names them.
func ChangedFiles(diff []byte) ([]string, error) {
	var files []string
	seen := map[string]bool{}
	var minus string
	for line := range strings.Lines(string(diff)) {
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(line, "--- "):
			minus = diffPath(line[4:])
		case strings.HasPrefix(line, "+++ "):
			p := diffPath(line[4:])
			if p == "" { // a deletion: +++ /dev/null
				p = minus
			}
			if p == "" {
				return nil, fmt.Errorf("ksource: diff: %q names no file", line)
			}
			if !filepath.IsLocal(p) {
				return nil, fmt.Errorf("ksource: diff: path %q leaves the source tree", p)
			}
			if !seen[p] {
				seen[p] = true
				files = append(files, p)
			}
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("ksource: diff changes no file (not a unified diff?)")
	}
	return files, nil
}

// diffPath strips the a/ or b/ prefix (-p1) and a trailing timestamp; ""
// for /dev/null.
func diffPath(s string) string {
	s, _, _ = strings.Cut(s, "\t")
	s = strings.TrimSpace(s)
	if s == "/dev/null" {
		return ""
	}
	if _, after, ok := strings.Cut(s, "/"); ok {
		return filepath.Clean(after)
	}
	return filepath.Clean(s)
}

// PatchedFiles applies diff to copies of the files it changes (GNU patch in
// a scratch directory; the tree is never written) and returns each changed
// file's new content by its path in the tree; a file the diff deletes maps
// to nil. A diff that does not apply cleanly is an error carrying patch's
// report, which names the file and the failed hunk.
func (t *Tree) PatchedFiles(ctx context.Context, diff []byte) (map[string][]byte, error) {
	files, err := ChangedFiles(diff)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "ksource-patch-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	for _, f := range files {
		b, err := t.ReadFile(f)
		if os.IsNotExist(err) {
			continue // a new file
		}
		if err != nil {
			return nil, fmt.Errorf("ksource: %w", err)
		}
		p := filepath.Join(tmp, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return nil, err
		}
	}
	// No fuzz: a hunk that only applies at a shifted context could mean
	// the diff was written for other sources than the guest's.
	cmd := exec.CommandContext(ctx, "patch", "-p1", "--batch", "--forward", "--fuzz=0",
		"--no-backup-if-mismatch", "--reject-file=-", "-d", tmp)
	cmd.Stdin = bytes.NewReader(diff)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("ksource: the diff does not apply to %s: %w\n%s", t.Dir, err, tail(out))
	}
	res := make(map[string][]byte, len(files))
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(tmp, f))
		if os.IsNotExist(err) {
			res[f] = nil
			continue
		}
		if err != nil {
			return nil, err
		}
		res[f] = b
	}
	return res, nil
}
