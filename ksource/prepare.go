package ksource

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Options tune Prepare.
type Options struct {
	// CacheDir holds the downloaded packages and the prepared trees. Empty
	// means $HVPATCH_BUILD_CACHE, else /var/cache/hvpatch/ksource: outside
	// any repository, as a prepared tree is 1.5 GB.
	CacheDir string
	// Progress, when set, gets one line per long step (download, extract,
	// configure, prepare) before it starts.
	Progress func(msg string)
}

// Step is one stage of making a tree ready, for reports and timing.
type Step struct {
	Name     string
	Duration time.Duration
	Cached   bool   // the result was already in the cache; Duration is the look-up
	Detail   string // what was done or found
}

// Tree is a kernel source tree configured and prepared for single-object
// builds.
type Tree struct {
	Dir   string
	Build Build
	// Packages lists "name=version" of every Debian package the tree came
	// from.
	Packages []string
	Steps    []Step

	// makeArgs are the variables every make in the tree gets, so that
	// kbuild sees the same compiler, architecture and release as Debian's
	// build did.
	makeArgs []string
}

// state is what a prepared tree in the cache records about itself.
type state struct {
	Build    Build
	Packages []string
	Steps    []Step
	MakeArgs []string
}

const stateFile = "hvpatch-ksource.json"

func cacheDir(opt Options) string {
	if opt.CacheDir != "" {
		return opt.CacheDir
	}
	if d := os.Getenv("HVPATCH_BUILD_CACHE"); d != "" {
		return d
	}
	return "/var/cache/hvpatch/ksource"
}

// Prepare returns the source tree of build b, configured with the .config
// Debian shipped for it and with kbuild's prepare stage done, so Compile can
// build any object of it. The first call downloads linux-source and the
// flavour's headers package into the cache (apt-get download: nothing is
// installed), extracts and prepares; later calls find the tree by source
// version and flavour. Callers in several processes are serialised by a
// file lock, so only one of them does the work.
func Prepare(ctx context.Context, b Build, opt Options) (*Tree, error) {
	if b.Version == "" || b.Series == "" || b.ABI == "" || b.Flavour == "" || b.Release == "" || b.Compiler == "" {
		return nil, fmt.Errorf("ksource: incomplete build %+v (use ParseBanner)", b)
	}
	progress := opt.Progress
	if progress == nil {
		progress = func(string) {}
	}
	root := cacheDir(opt)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("ksource: cache: %w", err)
	}
	key := strings.NewReplacer("/", "_", ":", "_").Replace(b.Version + "_" + b.Flavour)
	final := filepath.Join(root, key)

	start := time.Now()
	unlock, err := lockPath(ctx, final+".lock")
	if err != nil {
		return nil, err
	}
	defer unlock()
	if st, err := readState(final); err == nil && st.Build == b {
		t := &Tree{Dir: filepath.Join(final, "linux-source-"+b.Series), Build: b, Packages: st.Packages, makeArgs: st.MakeArgs}
		t.Steps = append(t.Steps, Step{Name: "cache", Duration: time.Since(start), Cached: true, Detail: final})
		for _, s := range st.Steps {
			s.Detail = fmt.Sprintf("cached (took %v when prepared; %s)", s.Duration.Round(time.Second/10), s.Detail)
			s.Duration, s.Cached = 0, true
			t.Steps = append(t.Steps, s)
		}
		return t, nil
	}

	cc, _, _ := strings.Cut(b.Compiler, " ")
	if err := checkHostTools(cc); err != nil {
		return nil, err
	}
	t := &Tree{Build: b, makeArgs: []string{"ARCH=x86", "CC=" + cc, "KERNELRELEASE=" + b.Release}}
	step := func(name string, f func() (cached bool, detail string, err error)) error {
		s := time.Now()
		cached, detail, err := f()
		if err != nil {
			return err
		}
		t.Steps = append(t.Steps, Step{Name: name, Duration: time.Since(s), Cached: cached, Detail: detail})
		return nil
	}

	src := pkg{"linux-source-" + b.Series, b.Version}
	hdr := pkg{"linux-headers-" + b.Release, b.Version}
	var debs []string
	err = step("download", func() (bool, string, error) {
		progress("ksource: downloading " + src.String() + " " + hdr.String())
		if err := ensureLists(ctx, src.Name); err != nil {
			return false, "", err
		}
		for _, p := range []pkg{src, hdr} {
			if err := requireVersion(ctx, p.Name, p.Version); err != nil {
				return false, "", err
			}
		}
		var cached bool
		var err error
		debs, cached, err = download(ctx, filepath.Join(root, "debs"), []pkg{src, hdr}, []string{"all", "amd64"})
		return cached, strings.Join(debs, " "), err
	})
	if err != nil {
		return nil, err
	}
	t.Packages = []string{src.String(), hdr.String()}

	// Work in a scratch directory renamed into place at the end, so an
	// interrupted Prepare never leaves a tree that looks ready.
	tmp := final + ".tmp"
	os.RemoveAll(tmp)
	os.RemoveAll(final)
	defer os.RemoveAll(tmp)
	dir := filepath.Join(tmp, "linux-source-"+b.Series)
	err = step("extract", func() (bool, string, error) {
		progress("ksource: extracting " + filepath.Base(debs[0]))
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return false, "", err
		}
		// The tarball's xz stream has many blocks: xz -T0 decompresses
		// them in parallel (14 s instead of ~50 s for 6.1 on two cores),
		// so extracting everything beats picking directories.
		script := `set -e -o pipefail
dpkg-deb --fsys-tarfile "$1" | tar -xO "./usr/src/linux-source-$3.tar.xz" | xz -T0 -dc | tar -x -C "$4"
dpkg-deb --fsys-tarfile "$2" | tar -xO "./usr/src/linux-headers-$5/.config" > "$4/linux-source-$3/.config"`
		out, err := exec.CommandContext(ctx, "bash", "-c", script, "extract", debs[0], debs[1], b.Series, tmp, b.Release).CombinedOutput()
		if err != nil {
			return false, "", fmt.Errorf("ksource: extracting %s: %w\n%s", filepath.Base(debs[0]), err, tail(out))
		}
		return false, "linux-source-" + b.Series + ".tar.xz and .config of " + hdr.Name, nil
	})
	if err != nil {
		return nil, err
	}
	shipped, err := os.ReadFile(filepath.Join(dir, ".config"))
	if err != nil {
		return nil, fmt.Errorf("ksource: %w", err)
	}
	t.Dir = dir
	// Kconfig asks the host's rustc for its version; Debian's build had
	// none when the shipped config says 0, so hide the host's.
	if v := configValue(shipped, "CONFIG_RUSTC_VERSION"); v == "" || v == "0" {
		t.makeArgs = append(t.makeArgs, "RUSTC=/nonexistent/rustc")
	}
	err = step("configure", func() (bool, string, error) {
		progress("ksource: make olddefconfig")
		if out, err := t.make(ctx, "olddefconfig"); err != nil {
			return false, "", fmt.Errorf("ksource: make olddefconfig: %w\n%s", err, tail(out))
		}
		// Kconfig re-evaluates what it learns from the host (compiler
		// and pahole versions, tool capabilities). Any difference from
		// Debian's .config would change the generated code.
		now, err := os.ReadFile(filepath.Join(dir, ".config"))
		if err != nil {
			return false, "", err
		}
		if d := configDiff(shipped, now); d != "" {
			return false, "", fmt.Errorf("ksource: the host's toolchain changes Debian's .config of %s (compiler or pahole differ from the build's?):\n%s", b.Release, d)
		}
		return false, "config identical to " + hdr.Name + "'s", nil
	})
	if err != nil {
		return nil, err
	}
	err = step("prepare", func() (bool, string, error) {
		progress("ksource: make prepare (generated headers, objtool)")
		if out, err := t.make(ctx, "-j"+strconv.Itoa(runtime.NumCPU()), "prepare"); err != nil {
			return false, "", fmt.Errorf("ksource: make prepare: %w\n%s", err, tail(out))
		}
		return false, "make " + strings.Join(t.makeArgs, " ") + " prepare", nil
	})
	if err != nil {
		return nil, err
	}

	js, _ := json.MarshalIndent(state{Build: b, Packages: t.Packages, Steps: t.Steps, MakeArgs: t.makeArgs}, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, stateFile), js, 0o644); err != nil {
		return nil, fmt.Errorf("ksource: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, fmt.Errorf("ksource: %w", err)
	}
	t.Dir = filepath.Join(final, "linux-source-"+b.Series)
	return t, nil
}

func readState(dir string) (*state, error) {
	js, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var st state
	if err := json.Unmarshal(js, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// checkHostTools names the Debian packages to install when a tool kbuild's
// prepare needs is missing. Kconfig's parser needs flex and bison, objtool
// needs libelf's headers, and Kconfig asks pahole for its version (a missing
// pahole turns BTF options off and so changes the config).
func checkHostTools(cc string) error {
	var miss []string
	for _, t := range [][2]string{{cc, cc}, {"make", "make"}, {"flex", "flex"}, {"bison", "bison"}, {"bc", "bc"},
		{"pahole", "dwarves"}, {"xz", "xz-utils"}, {"dpkg-deb", "dpkg"}, {"apt-get", "apt"}, {"patch", "patch"}, {"perl", "perl"}} {
		if _, err := exec.LookPath(t[0]); err != nil {
			miss = append(miss, t[1])
		}
	}
	if _, err := os.Stat("/usr/include/gelf.h"); err != nil {
		miss = append(miss, "libelf-dev")
	}
	if len(miss) > 0 {
		return fmt.Errorf("ksource: %w: install them with: apt-get install --no-install-recommends %s", errNoTool, strings.Join(miss, " "))
	}
	return nil
}

// configDiff lists the option lines that differ between two .config files
// (comments aside), or "" when they agree.
func configDiff(a, b []byte) string {
	opts := func(c []byte) map[string]string {
		m := map[string]string{}
		sc := bufio.NewScanner(bytes.NewReader(c))
		for sc.Scan() {
			l := sc.Text()
			if k, v, ok := strings.Cut(l, "="); ok && strings.HasPrefix(l, "CONFIG_") {
				m[k] = v
			} else if n, ok := strings.CutSuffix(strings.TrimPrefix(l, "# "), " is not set"); ok {
				m[n] = "n"
			}
		}
		return m
	}
	ma, mb := opts(a), opts(b)
	var d []string
	for k, v := range ma {
		if mb[k] != v {
			d = append(d, fmt.Sprintf("  %s: shipped %q, now %q", k, v, mb[k]))
		}
	}
	for k, v := range mb {
		if _, ok := ma[k]; !ok {
			d = append(d, fmt.Sprintf("  %s: not in shipped config, now %q", k, v))
		}
	}
	return strings.Join(d, "\n")
}

// Open takes an already prepared kernel tree (make olddefconfig and make
// prepare done) for kernels whose sources are not in the Debian archive.
// The compiler is the one the tree's .config was made with.
func Open(dir string) (*Tree, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	cfg, err := os.ReadFile(filepath.Join(dir, ".config"))
	if err != nil {
		return nil, fmt.Errorf("ksource: %s is no configured kernel tree: %w", dir, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "include/generated/autoconf.h")); err != nil {
		return nil, fmt.Errorf("ksource: %s is not prepared (run make olddefconfig && make prepare there): %w", dir, err)
	}
	t := &Tree{Dir: dir}
	if cc := configValue(cfg, "CONFIG_CC_VERSION_TEXT"); cc != "" {
		t.Build.Compiler = cc
		name, _, _ := strings.Cut(cc, " ")
		t.makeArgs = append(t.makeArgs, "CC="+name)
	}
	if rel, err := os.ReadFile(filepath.Join(dir, "include/config/kernel.release")); err == nil {
		t.Build.Release = strings.TrimSpace(string(rel))
	}
	return t, nil
}

// configValue returns an option's value from a .config, unquoted.
func configValue(cfg []byte, name string) string {
	for l := range strings.Lines(string(cfg)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), name+"="); ok {
			if u, err := strconv.Unquote(v); err == nil {
				return u
			}
			return v
		}
	}
	return ""
}

// CheckCompiler verifies that the tree's compiler is the one the guest's
// kernel was built with (the compiler text of its banner): another gcc
// release generates different code, and nothing compiled could be compared
// with the guest's.
func (t *Tree) CheckCompiler(bannerCompiler string) error {
	cc := "gcc"
	for _, a := range t.makeArgs {
		if v, ok := strings.CutPrefix(a, "CC="); ok {
			cc = v
		}
	}
	out, err := exec.Command(cc, "--version").Output()
	if err != nil {
		return fmt.Errorf("ksource: the guest was built with %q, and the host has no %s: %v", bannerCompiler, cc, err)
	}
	host, _, _ := strings.Cut(string(out), "\n")
	host = strings.TrimSpace(host)
	if host != strings.TrimSpace(bannerCompiler) {
		return fmt.Errorf("ksource: compiler mismatch: the guest kernel was built with %q, the host's %s is %q", bannerCompiler, cc, host)
	}
	return nil
}

// ReadFile reads a file of the tree; rel must stay inside it.
func (t *Tree) ReadFile(rel string) ([]byte, error) {
	p, err := t.path(rel)
	if err != nil {
		return nil, err
	}
	return os.ReadFile(p)
}

func (t *Tree) path(rel string) (string, error) {
	c := filepath.Clean(rel)
	if !filepath.IsLocal(c) {
		return "", fmt.Errorf("ksource: path %q leaves the source tree", rel)
	}
	return filepath.Join(t.Dir, c), nil
}

// make runs make in the tree with the tree's variables and a cleaned
// environment: kbuild reads KCFLAGS, ARCH and friends from the environment
// too, and a stray one would change the flags.
func (t *Tree) make(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "make", append(append([]string{"-C", t.Dir}, t.makeArgs...), args...)...)
	for _, e := range os.Environ() {
		k, _, _ := strings.Cut(e, "=")
		switch k {
		case "KCFLAGS", "KCPPFLAGS", "KAFLAGS", "KBUILD_OUTPUT", "O", "ARCH", "CROSS_COMPILE", "CC", "LLVM", "MAKEFLAGS", "MFLAGS", "W", "V", "C":
			continue
		}
		if strings.HasPrefix(k, "KBUILD_") {
			continue
		}
		cmd.Env = append(cmd.Env, e)
	}
	cmd.Env = append(cmd.Env, "LC_ALL=C")
	// Kill the whole process group on cancel: gcc and objtool must not
	// outlive us and write into the tree after it is restored.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil && ctx.Err() != nil {
		err = errors.Join(ctx.Err(), err)
	}
	return out.Bytes(), err
}

// lockPath takes an exclusive flock on path (created if needed), waiting
// until ctx ends. The kernel drops the lock if the process dies.
func lockPath(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		if f, err = os.Open(path); err != nil { // a directory
			return nil, fmt.Errorf("ksource: lock: %w", err)
		}
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("ksource: lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("ksource: waiting for lock %s: %w", path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
