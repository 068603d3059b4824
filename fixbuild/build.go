// Package fixbuild turns a kernel source fix (a unified diff) into a patch
// bundle for the exact kernel build a guest runs: the patch file with one
// replace edit per changed function, and the objects holding the new code.
//
// The steps, each reported with its duration:
//
//	identify  the guest's build from its banner (Debian source version,
//	          flavour, compiler) and its GNU build id
//	source    the Debian source, headers and kbuild packages of that build,
//	          prepared once and cached (package ksource)
//	verify    each changed .c compiled as the guest's kernel was; every
//	          function must equal the guest's bytes (package objdiff)
//	diff      compiled again with -ffunction-sections, before and after the
//	          fix; changed and new functions, refusals
//	extract   the new code as one object per file, references to the rest
//	          of the kernel as kallsyms names
//	bundle    patch file + objects (SHA-256 of each in the patch file, so a
//	          signature over the patch file covers the code)
package fixbuild

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/kobj"
	"github.com/hvpatch/hvpatch/ksource"
	"github.com/hvpatch/hvpatch/objdiff"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/symbols"
)

// Guest is the kernel a fix is built for.
type Guest struct {
	Banner  string // linux_banner
	Release string
	BuildID string // GNU build id, hex ("" if the kernel has none)
	Symbols *symbols.Table
	Read    func(addr uint64, b []byte) error
	// ModuleSymbols lists the loaded modules' symbols, for fixes in module
	// code (nil: only the kernel image is searched).
	ModuleSymbols func() ([]symbols.Symbol, error)
}

// Lookup and ReadVirt make Guest an objdiff.Guest.
func (g Guest) Lookup(name string) []symbols.Symbol  { return g.Symbols.Lookup(name) }
func (g Guest) ReadVirt(addr uint64, b []byte) error { return g.Read(addr, b) }

// Options of a build.
type Options struct {
	ID       string // patch id; default from the diff's subject or file name
	OutDir   string // the bundle goes to OutDir/ID
	Source   string // a prepared tree to use instead of Debian's packages
	Cache    string // ksource cache directory ("" for its default)
	Progress func(msg string)
	// DiffName is the diff's file name, for the default id and the report.
	DiffName string
}

// Step is one timed step of the build.
type Step struct {
	Name     string        `json:"name"`
	Duration time.Duration `json:"duration_ns"`
	Cached   bool          `json:"cached,omitempty"`
	Detail   string        `json:"detail,omitempty"`
}

// Function is one function the bundle replaces or adds.
type Function struct {
	Name   string `json:"name"`
	File   string `json:"file"`
	Module string `json:"module,omitempty"` // the loaded module holding it; "" for the kernel image
	Kind   string `json:"kind"`             // "changed" or "new"
	Sympos int    `json:"sympos,omitempty"`
	Addr   uint64 `json:"guest_addr,omitempty"`
}

// Result describes a finished build.
type Result struct {
	PatchFile string        `json:"patch_file"`
	ID        string        `json:"id"`
	Release   string        `json:"release"`
	BuildID   string        `json:"build_id,omitempty"`
	Source    string        `json:"source_version,omitempty"`
	Packages  []string      `json:"packages,omitempty"`
	Functions []Function    `json:"functions"`
	LineOnly  []string      `json:"line_only,omitempty"` // differ only in __LINE__ immediates
	Objects   []string      `json:"objects"`
	Notes     []string      `json:"notes,omitempty"`
	Steps     []Step        `json:"steps"`
	Total     time.Duration `json:"total_ns"`
}

// RefusedError is a fix hvpatch will not turn into a hot patch.
type RefusedError struct {
	File   string
	Reason error
}

func (e *RefusedError) Error() string {
	if e.File == "" {
		return e.Reason.Error()
	}
	return fmt.Sprintf("%s: %v", e.File, e.Reason)
}

func (e *RefusedError) Unwrap() error { return e.Reason }

func refuse(file, format string, args ...any) error {
	return &RefusedError{File: file, Reason: &objdiff.Refusal{Reason: fmt.Sprintf(format, args...)}}
}

// Build runs every step for one diff.
func Build(ctx context.Context, g Guest, diff []byte, opt Options) (*Result, error) {
	start := time.Now()
	progress := opt.Progress
	if progress == nil {
		progress = func(string) {}
	}
	res := &Result{Release: g.Release, BuildID: g.BuildID}
	step := func(name string, f func() (string, error)) error {
		s := time.Now()
		detail, err := f()
		res.Steps = append(res.Steps, Step{Name: name, Duration: time.Since(s), Detail: detail})
		return err
	}

	files, err := ksource.ChangedFiles(diff)
	if err != nil {
		return nil, err
	}
	var cfiles []string
	for _, f := range files {
		switch {
		case strings.HasSuffix(f, ".c"):
			cfiles = append(cfiles, f)
		case strings.HasSuffix(f, ".h"):
			return nil, refuse(f, "the fix changes a header; every object including it would have to be rebuilt and compared, which hvpatch build does not do (it rebuilds only the .c files a fix changes)")
		case strings.HasSuffix(f, ".S"), strings.HasSuffix(f, ".s"):
			return nil, refuse(f, "the fix changes assembly, which has no fentry sites and no compiler output to compare")
		default:
			return nil, refuse(f, "the fix changes a file that is not C source (build files, Kconfig, documentation are not code in the running kernel)")
		}
	}
	id := opt.ID
	if id == "" {
		id = defaultID(diff, opt.DiffName)
	}
	res.ID = id

	var tree *ksource.Tree
	b, berr := ksource.ParseBanner(g.Banner)
	if err := step("identify", func() (string, error) {
		if opt.Source != "" {
			t, err := ksource.Open(opt.Source)
			if err != nil {
				return "", err
			}
			tree = t
			return "source tree " + t.Dir, nil
		}
		if berr != nil {
			return "", fmt.Errorf("%w (for kernels not built by Debian, give a prepared tree with --source DIR)", berr)
		}
		res.Source = b.Version
		return fmt.Sprintf("%s, Debian source %s, %s", b.Release, b.Version, b.Compiler), nil
	}); err != nil {
		return nil, err
	}
	if tree == nil {
		progress(fmt.Sprintf("preparing the %s source tree of %s", b.Version, b.Release))
		t, err := ksource.Prepare(ctx, b, ksource.Options{CacheDir: opt.Cache, Progress: progress})
		if err != nil {
			return nil, err
		}
		tree = t
		for _, s := range t.Steps {
			res.Steps = append(res.Steps, Step{Name: "source: " + s.Name, Duration: s.Duration, Cached: s.Cached, Detail: s.Detail})
		}
		res.Packages = t.Packages
	}
	if berr == nil {
		// A tree given with --source is checked against the guest too.
		if err := tree.CheckCompiler(b.Compiler); err != nil {
			return nil, err
		}
	}
	var patched map[string][]byte
	if err := step("apply diff", func() (string, error) {
		var err error
		patched, err = tree.PatchedFiles(ctx, diff)
		return strings.Join(cfiles, ", "), err
	}); err != nil {
		return nil, err
	}

	out := filepath.Join(opt.OutDir, id)
	var edits []editLine
	objects := map[string]string{}
	for _, rel := range cfiles {
		objName := strings.NewReplacer("/", "-", ".c", ".o").Replace(rel)
		ed, obj, err := buildFile(ctx, tree, g, rel, patched[rel], res, step, progress)
		if err != nil {
			return nil, err
		}
		if obj == nil {
			continue
		}
		if err := os.MkdirAll(out, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(out, objName), obj, 0o644); err != nil {
			return nil, err
		}
		sum := sha256.Sum256(obj)
		objects[objName] = hex.EncodeToString(sum[:])
		res.Objects = append(res.Objects, filepath.Join(out, objName))
		for i := range ed {
			ed[i].object = objName
		}
		edits = append(edits, ed...)
	}
	if len(edits) == 0 {
		return nil, refuse("", "the fix changes no function's code in %s (only __LINE__ immediates, comments or unused code)", strings.Join(cfiles, ", "))
	}
	if err := step("bundle", func() (string, error) {
		text := patchText(id, describe(diff, opt.DiffName), g, objects, edits)
		if _, err := patcher.ParsePatch([]byte(text)); err != nil {
			return "", fmt.Errorf("the generated patch file does not parse: %w", err)
		}
		res.PatchFile = filepath.Join(out, id+".yaml")
		return res.PatchFile, writeAtomic(res.PatchFile, []byte(text))
	}); err != nil {
		return nil, err
	}
	res.Total = time.Since(start)
	return res, nil
}

type editLine struct {
	function string
	sympos   int
	module   string
	object   string
}

// buildFile compiles one file three times and cuts out its new code.
func buildFile(ctx context.Context, tree *ksource.Tree, g Guest, rel string, fixed []byte, res *Result,
	step func(string, func() (string, error)) error, progress func(string)) ([]editLine, []byte, error) {
	if fixed == nil {
		return nil, nil, fmt.Errorf("%s: the diff gave no new content", rel)
	}
	compile := func(what string, content []byte, mode ksource.Mode) ([]byte, *kobj.File, error) {
		var raw []byte
		var f *kobj.File
		err := step(what+" "+rel, func() (string, error) {
			progress("compiling " + rel + " (" + what + ")")
			var err error
			if raw, err = tree.Compile(ctx, rel, content, mode); err != nil {
				return "", err
			}
			f, err = kobj.Read(raw)
			return fmt.Sprintf("%d bytes", len(raw)), err
		})
		return raw, f, err
	}
	_, normal, err := compile("compile (as the guest's)", nil, ksource.Normal)
	if err != nil {
		return nil, nil, err
	}
	var match *objdiff.Match
	var view objdiff.Guest
	var module string
	if err := step("verify "+rel, func() (string, error) {
		var err error
		view, module, match, err = verifyWhere(normal, g)
		if err != nil {
			return "", &RefusedError{File: rel, Reason: fmt.Errorf("the compiled source is not the guest's code: %w", err)}
		}
		where := "the kernel image"
		if module != "" {
			where = "module " + module
		}
		return fmt.Sprintf("%d functions equal the guest's bytes in %s, %d not compared", match.Verified, where, len(match.Skipped)), nil
	}); err != nil {
		return nil, nil, err
	}
	rawBefore, before, err := compile("compile (before, function sections)", nil, ksource.FunctionSections)
	if err != nil {
		return nil, nil, err
	}
	rawAfter, after, err := compile("compile (after, function sections)", fixed, ksource.FunctionSections)
	if err != nil {
		return nil, nil, err
	}
	var change *objdiff.Change
	if err := step("diff "+rel, func() (string, error) {
		layout, err := objdiff.LayoutChanges(rawBefore, rawAfter)
		if err != nil {
			return "", err
		}
		if len(layout) > 0 {
			return "", refuse(rel, "the fix changes the layout of types the running kernel already has objects of: %s", strings.Join(layout, "; "))
		}
		change, err = objdiff.Diff(before, after)
		if err != nil {
			var r *objdiff.Refusal
			if errors.As(err, &r) {
				return "", &RefusedError{File: rel, Reason: err}
			}
			return "", err
		}
		return fmt.Sprintf("changed %v, new %v, line-only %v", change.Changed, change.New, change.LineOnly), nil
	}); err != nil {
		return nil, nil, err
	}
	res.LineOnly = append(res.LineOnly, change.LineOnly...)
	if len(change.Changed) == 0 {
		res.Notes = append(res.Notes, rel+": no function changed")
		return nil, nil, nil
	}
	var ex *objdiff.Extracted
	if err := step("extract "+rel, func() (string, error) {
		var err error
		ex, err = objdiff.Extract(objdiff.Inputs{Before: before, After: after, Change: change, Match: match, Guest: view})
		if err != nil {
			var r *objdiff.Refusal
			if errors.As(err, &r) {
				return "", &RefusedError{File: rel, Reason: err}
			}
			return "", fmt.Errorf("%s: %w", rel, err)
		}
		return fmt.Sprintf("%d bytes, %d kernel symbols used", len(ex.Object), len(ex.Imports)), nil
	}); err != nil {
		return nil, nil, err
	}
	for _, n := range ex.Notes {
		res.Notes = append(res.Notes, rel+": "+n)
	}
	var edits []editLine
	for _, r := range ex.Replaces {
		res.Functions = append(res.Functions, Function{Name: r.Function, File: rel, Module: module, Kind: "changed", Sympos: r.Sympos, Addr: r.Addr})
		edits = append(edits, editLine{function: r.Function, sympos: r.Sympos, module: module})
	}
	for _, n := range change.New {
		res.Functions = append(res.Functions, Function{Name: n, File: rel, Module: module, Kind: "new"})
	}
	return edits, ex.Object, nil
}

var idClean = regexp.MustCompile(`[^a-z0-9._-]+`)

// defaultID makes a patch id from the diff's file name or subject.
func defaultID(diff []byte, name string) string {
	base := strings.TrimSuffix(strings.TrimSuffix(filepath.Base(name), ".diff"), ".patch")
	if base == "" || base == "." || base == "-" {
		base = describe(diff, "")
	}
	id := strings.Trim(idClean.ReplaceAllString(strings.ToLower(base), "-"), "-._")
	if len(id) > 64 {
		id = strings.TrimRight(id[:64], "-._")
	}
	if id == "" {
		id = "fix"
	}
	return id
}

// describe takes the subject line of a git-format diff, else its name.
func describe(diff []byte, name string) string {
	for line := range strings.Lines(string(diff)) {
		if s, ok := strings.CutPrefix(strings.TrimSpace(line), "Subject:"); ok {
			s = strings.TrimSpace(s)
			if i := strings.Index(s, "] "); strings.HasPrefix(s, "[") && i > 0 {
				s = s[i+2:]
			}
			return s
		}
		if strings.HasPrefix(line, "diff ") || strings.HasPrefix(line, "--- ") {
			break
		}
	}
	if name != "" {
		return "fix from " + filepath.Base(name)
	}
	return "fix"
}

// patchText writes the bundle's patch file. It is generated text, so it is
// written field by field in a fixed order that reads well in a review.
func patchText(id, desc string, g Guest, objects map[string]string, edits []editLine) string {
	var b strings.Builder
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	fmt.Fprintf(&b, "# Built by hvpatch build for %s; every function below was compared\n# with the guest's own bytes before it was diffed.\n", g.Release)
	fmt.Fprintf(&b, "id: %s\n", id)
	fmt.Fprintf(&b, "description: %s\n", q(desc))
	b.WriteString("match:\n")
	fmt.Fprintf(&b, "  release: %s\n", q(g.Release))
	if g.BuildID != "" {
		fmt.Fprintf(&b, "  build_id: %s\n", q(g.BuildID))
	}
	// Several functions switch at once: none may be running or on a stack
	// when they do (the apply retries, then refuses naming the task).
	b.WriteString("consistency: stack\n")
	b.WriteString("objects:\n")
	for _, name := range slices.Sorted(maps.Keys(objects)) {
		fmt.Fprintf(&b, "  %s: %s\n", q(name), q(objects[name]))
	}
	b.WriteString("edits:\n")
	for _, e := range edits {
		fmt.Fprintf(&b, "  - {kind: replace, function: %s", e.function)
		if e.module != "" {
			fmt.Fprintf(&b, ", module: %s", e.module)
		}
		if e.sympos > 0 {
			fmt.Fprintf(&b, ", sympos: %d", e.sympos)
		}
		fmt.Fprintf(&b, ", object: %s, with: %s}\n", q(e.object), e.function)
	}
	return b.String()
}

func writeAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
