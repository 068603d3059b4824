package ksource

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// pkg is one Debian package at one version.
type pkg struct{ Name, Version string }

func (p pkg) String() string { return p.Name + "=" + p.Version }

// debFile is the name apt-get download gives the package's file (an epoch's
// colon is written %3a).
func (p pkg) debFile(arch string) string {
	return p.Name + "_" + strings.ReplaceAll(p.Version, ":", "%3a") + "_" + arch + ".deb"
}

// madison lists the versions of name the host's apt lists know, newest first.
func madison(ctx context.Context, name string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "madison", name).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache madison %s: %w", name, err)
	}
	var vs []string
	for line := range strings.Lines(string(out)) {
		f := strings.Split(line, "|")
		if len(f) >= 2 {
			v := strings.TrimSpace(f[1])
			if len(vs) == 0 || vs[len(vs)-1] != v {
				vs = append(vs, v)
			}
		}
	}
	return vs, nil
}

// ensureLists runs apt-get update once when the host's lists do not know the
// source package at all (a fresh container has no lists).
func ensureLists(ctx context.Context, probe string) error {
	if vs, err := madison(ctx, probe); err == nil && len(vs) > 0 {
		return nil
	}
	out, err := exec.CommandContext(ctx, "apt-get", "update").CombinedOutput()
	if err != nil {
		return fmt.Errorf("ksource: apt-get update (is the Debian mirror reachable?): %w\n%s", err, tail(out))
	}
	return nil
}

// requireVersion checks that the archive still serves name at version, and
// names the versions it does serve when not.
func requireVersion(ctx context.Context, name, version string) error {
	vs, err := madison(ctx, name)
	if err != nil {
		return fmt.Errorf("ksource: %w", err)
	}
	for _, v := range vs {
		if v == version {
			return nil
		}
	}
	if len(vs) == 0 {
		return fmt.Errorf("ksource: the archive has no package %s (not in the host's apt lists)", name)
	}
	return fmt.Errorf("ksource: the archive has no %s=%s; it has %s", name, version, strings.Join(vs, ", "))
}

// download fetches pkgs into dir with apt-get download (never installing
// them) unless their files are there already. It returns the file paths and
// whether every file was cached.
func download(ctx context.Context, dir string, pkgs []pkg, arch []string) ([]string, bool, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, false, err
	}
	paths := make([]string, len(pkgs))
	var missing []string
	for i, p := range pkgs {
		paths[i] = filepath.Join(dir, p.debFile(arch[i]))
		if _, err := os.Stat(paths[i]); err != nil {
			missing = append(missing, p.String())
		}
	}
	if len(missing) == 0 {
		return paths, true, nil
	}
	cmd := exec.CommandContext(ctx, "apt-get", append([]string{"download", "-q"}, missing...)...)
	cmd.Dir = dir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return nil, false, fmt.Errorf("ksource: apt-get download %s (is the Debian mirror reachable?): %w\n%s", strings.Join(missing, " "), err, tail(out.Bytes()))
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			return nil, false, fmt.Errorf("ksource: apt-get download left no %s", filepath.Base(p))
		}
	}
	return paths, false, nil
}

// tail keeps the end of a command's output for an error message.
func tail(out []byte) string {
	const max = 4000
	out = bytes.TrimSpace(out)
	if len(out) > max {
		out = append([]byte("..."), out[len(out)-max:]...)
	}
	return string(out)
}

var errNoTool = errors.New("missing host tool")
