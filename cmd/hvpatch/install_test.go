package main

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// makeInstall runs make TARGET in the repository with vars, binaries built
// into bin.
func makeInstall(t *testing.T, bin, target string, vars ...string) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("make", append([]string{"--no-print-directory", "-C", root, target, "BIN=" + bin}, vars...)...)
	for _, e := range os.Environ() {
		if k, _, _ := strings.Cut(e, "="); k != "MAKEFLAGS" && k != "MFLAGS" && k != "MAKELEVEL" && !strings.HasPrefix(k, "HVPATCH") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %s %q: %v\n%s", target, vars, err, out)
	}
	return string(out)
}

// files lists the regular files under dir (relative, with their modes).
func files(t *testing.T, dir string) map[string]fs.FileMode {
	t.Helper()
	out := map[string]fs.FileMode{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = info.Mode()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestMakeInstall: make install DESTDIR=... puts the binaries, the systemd
// unit (its paths following PREFIX), the default configuration (kept when
// one exists), bash/zsh/fish completions and one man page per command
// (and hvpatchd.8) where PREFIX says, and nothing else outside the docs;
// make uninstall removes them but the configuration.
func TestMakeInstall(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatal("make install needs make:", err)
	}
	bin := t.TempDir()
	dest := t.TempDir()
	makeInstall(t, bin, "install", "DESTDIR="+dest)
	got := files(t, dest)

	// The man pages cobra's doc package writes: one per available command
	// (hidden ones left out), completion's included.
	root := newRootCmd()
	root.InitDefaultCompletionCmd()
	want := map[string]fs.FileMode{
		"usr/local/bin/hvpatch":                                      0o755,
		"usr/local/bin/hvpatchd":                                     0o755,
		"usr/local/lib/systemd/system/hvpatchd.service":              0o644,
		"etc/hvpatch/hvpatchd.yaml":                                  0o644,
		"usr/local/share/bash-completion/completions/hvpatch":        0o644,
		"usr/local/share/zsh/site-functions/_hvpatch":                0o644,
		"usr/local/share/fish/vendor_completions.d/hvpatch.fish":     0o644,
		"usr/local/share/man/man8/hvpatchd.8":                        0o644,
		"usr/local/share/doc/hvpatch/openapi.json":                   0o644,
		"usr/local/share/doc/hvpatch/examples/python/hvpatch_api.py": 0o644,
	}
	var commands []*cobra.Command
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c != root && (!c.IsAvailableCommand() || c.IsAdditionalHelpTopicCommand()) {
			return
		}
		commands = append(commands, c)
		want["usr/local/share/man/man1/"+strings.ReplaceAll(c.CommandPath(), " ", "-")+".1"] = 0o644
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	if len(commands) < 15 {
		t.Fatalf("only %d commands", len(commands))
	}
	for p, mode := range want {
		if m, ok := got[p]; !ok {
			t.Errorf("not installed: %s", p)
		} else if m.Perm() != mode {
			t.Errorf("%s: mode %v, want %v", p, m.Perm(), mode)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok && !strings.HasPrefix(p, "usr/local/share/doc/hvpatch/") {
			t.Errorf("installed, not expected: %s", p)
		}
	}
	if fi, err := os.Stat(filepath.Join(dest, "etc/hvpatch/patches")); err != nil || !fi.IsDir() {
		t.Errorf("no patch directory etc/hvpatch/patches: %v", err)
	}
	read := func(p string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dest, p))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}

	for _, b := range []string{"hvpatch", "hvpatchd"} {
		out, err := exec.Command(filepath.Join(dest, "usr/local/bin", b), "--version").Output()
		if err != nil || !strings.HasPrefix(string(out), b+" ") {
			t.Errorf("installed %s --version: %q %v", b, out, err)
		}
	}
	if read("etc/hvpatch/hvpatchd.yaml") != string(mustReadFile(t, "../../configs/hvpatchd.yaml")) {
		t.Error("etc/hvpatch/hvpatchd.yaml is not configs/hvpatchd.yaml")
	}
	unit := read("usr/local/lib/systemd/system/hvpatchd.service")
	if !strings.Contains(unit, "\nExecStart=/usr/local/bin/hvpatchd --config /etc/hvpatch/hvpatchd.yaml\n") {
		t.Errorf("unit's ExecStart:\n%s", unit)
	}
	for p, marker := range map[string]string{
		"usr/local/share/bash-completion/completions/hvpatch":    "__start_hvpatch",
		"usr/local/share/zsh/site-functions/_hvpatch":            "#compdef hvpatch",
		"usr/local/share/fish/vendor_completions.d/hvpatch.fish": "complete -c hvpatch",
	} {
		if !strings.Contains(read(p), marker) {
			t.Errorf("%s: no %q: not a completion script for hvpatch", p, marker)
		}
	}

	// Man pages: a title, the command's synopsis and examples, and roff
	// that groff formats without a warning.
	groff, _ := exec.LookPath("groff")
	for _, c := range commands {
		name := strings.ReplaceAll(c.CommandPath(), " ", "-")
		page := read("usr/local/share/man/man1/" + name + ".1")
		if !strings.Contains(page, `.TH "`+strings.ToUpper(name)+`" "1"`) {
			t.Errorf("%s.1: no title line: %.200q", name, page)
		}
		if c.Runnable() && !strings.Contains(page, ".SH SYNOPSIS") {
			t.Errorf("%s.1: no synopsis", name)
		}
		if c.Example != "" && !strings.Contains(page, ".SH EXAMPLE") {
			t.Errorf("%s.1: no examples", name)
		}
		if strings.Contains(page, "gendocs") {
			t.Errorf("%s.1 mentions the hidden gendocs command", name)
		}
	}
	d8 := read("usr/local/share/man/man8/hvpatchd.8")
	for _, s := range []string{`.TH "HVPATCHD" "8"`, "--config", "--api-socket", "--require-signed", "/openapi.json"} {
		if !strings.Contains(d8, s) {
			t.Errorf("hvpatchd.8: no %q", s)
		}
	}
	if strings.Contains(d8, "gen-man") {
		t.Error("hvpatchd.8 documents the hidden --gen-man")
	}
	if groff != "" {
		pages, _ := filepath.Glob(filepath.Join(dest, "usr/local/share/man/man*/*"))
		for _, p := range pages {
			// -k: through preconv, as man(1) reads them (UTF-8 text).
			cmd := exec.Command(groff, "-k", "-man", "-Tutf8", "-ww", "-z", p)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Run(); err != nil || stderr.Len() > 0 {
				t.Errorf("groff %s: %v %s", filepath.Base(p), err, stderr.String())
			}
		}
	}

	// Again over an edited configuration: it is kept.
	mine := "# edited by the operator\nlog: {level: debug}\n"
	os.WriteFile(filepath.Join(dest, "etc/hvpatch/hvpatchd.yaml"), []byte(mine), 0o600)
	if out := makeInstall(t, bin, "install", "DESTDIR="+dest); !strings.Contains(out, "keeping") {
		t.Errorf("second make install does not say it keeps the configuration:\n%s", out)
	}
	if read("etc/hvpatch/hvpatchd.yaml") != mine {
		t.Error("make install overwrote an existing configuration")
	}

	// Uninstall: only the configuration stays.
	makeInstall(t, bin, "uninstall", "DESTDIR="+dest)
	if left := files(t, dest); len(left) != 1 || left["etc/hvpatch/hvpatchd.yaml"] == 0 {
		t.Errorf("after make uninstall: %v, want only etc/hvpatch/hvpatchd.yaml", left)
	}

	// Another PREFIX and SYSCONFDIR: everything under them, and the unit
	// names them.
	dest2 := t.TempDir()
	makeInstall(t, bin, "install", "DESTDIR="+dest2, "PREFIX=/opt/hvpatch", "SYSCONFDIR=/opt/hvpatch/etc")
	var paths []string
	for p := range files(t, dest2) {
		paths = append(paths, p)
		if !strings.HasPrefix(p, "opt/hvpatch/") {
			t.Errorf("PREFIX=/opt/hvpatch: installed %s", p)
		}
	}
	sort.Strings(paths)
	for _, p := range []string{"opt/hvpatch/bin/hvpatchd", "opt/hvpatch/etc/hvpatch/hvpatchd.yaml", "opt/hvpatch/share/man/man1/hvpatch.1"} {
		if !slices.Contains(paths, p) {
			t.Errorf("PREFIX=/opt/hvpatch: no %s", p)
		}
	}
	unit2, _ := os.ReadFile(filepath.Join(dest2, "opt/hvpatch/lib/systemd/system/hvpatchd.service"))
	for _, s := range []string{"\nExecStart=/opt/hvpatch/bin/hvpatchd --config /opt/hvpatch/etc/hvpatch/hvpatchd.yaml\n",
		"\nDocumentation=file:///opt/hvpatch/share/doc/hvpatch/README.md\n"} {
		if !strings.Contains(string(unit2), s) {
			t.Errorf("PREFIX=/opt/hvpatch: unit without %q:\n%s", s, unit2)
		}
	}
}

func mustReadFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
