package ksource

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Mode selects how Compile builds an object.
type Mode int

const (
	// Normal builds exactly as kbuild built the guest's kernel.
	Normal Mode = iota
	// FunctionSections adds -ffunction-sections -fdata-sections (through
	// KCFLAGS, so kbuild's flags and objtool are otherwise unchanged):
	// each function and object in its own section, for linking single
	// functions into a patch.
	FunctionSections
)

// journal records what a Compile changes in the tree, so that a process
// killed in the middle (its make and compiler run on, in their own process
// group) leaves enough to undo it: the next Compile on the tree puts back
// the source it replaced and removes the object it was making.
type journal struct {
	Rel     string
	Content []byte // the original source, when Compile replaced it
	ModTime time.Time
	// Object is the object being built, HadObject whether it was there
	// before (then Compile itself puts it back).
	Object    string `json:",omitempty"`
	HadObject bool   `json:",omitempty"`
}

const journalFile = ".hvpatch-ksource-restore.json"

// Compile builds one object of the tree: rel is its source ("fs/proc/version.c").
// It goes through the tree's own make, so the flags, KBUILD_MODNAME, objtool
// and the other post-processing are those of kbuild. When content is not nil
// it stands in for the file's content during the build; the tree is put back
// as it was afterwards, also on error or cancellation, and holds a lock while
// compiling so concurrent callers take turns. The error of a failed build
// carries the compiler's output.
func (t *Tree) Compile(ctx context.Context, rel string, content []byte, mode Mode) ([]byte, error) {
	src, err := t.path(rel)
	if err != nil {
		return nil, err
	}
	rel = filepath.Clean(rel)
	ext := filepath.Ext(rel)
	if ext != ".c" && ext != ".S" {
		return nil, fmt.Errorf("ksource: %s: only .c and .S files compile to objects", rel)
	}
	objRel := strings.TrimSuffix(rel, ext) + ".o"

	unlock, err := lockPath(ctx, t.Dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := t.restoreJournal(); err != nil {
		return nil, err
	}
	st, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("ksource: %w", err)
	}

	// kbuild leaves the object, its .cmd and sometimes temporaries next
	// to the source: everything new in that directory goes afterwards.
	objDir := filepath.Dir(src)
	before, err := dirNames(objDir)
	if err != nil {
		return nil, err
	}
	defer func() {
		after, _ := dirNames(objDir)
		for n := range after {
			if !before[n] {
				os.Remove(filepath.Join(objDir, n))
			}
		}
	}()
	obj := filepath.Join(t.Dir, objRel)
	if before[filepath.Base(obj)] {
		// A left-over object: kbuild would find it up to date.
		if old, err := os.ReadFile(obj); err == nil {
			defer os.WriteFile(obj, old, 0o644)
		}
		os.Remove(obj)
	}

	j := journal{Rel: rel, ModTime: st.ModTime(), Object: objRel, HadObject: before[filepath.Base(obj)]}
	if content != nil {
		if j.Content, err = os.ReadFile(src); err != nil {
			return nil, fmt.Errorf("ksource: %w", err)
		}
	}
	js, _ := json.Marshal(j)
	if err := os.WriteFile(filepath.Join(t.Dir, journalFile), js, 0o644); err != nil {
		return nil, fmt.Errorf("ksource: %w", err)
	}
	defer t.restoreJournal()
	if content != nil {
		if err := os.WriteFile(src, content, st.Mode().Perm()); err != nil {
			return nil, fmt.Errorf("ksource: %w", err)
		}
	}

	args := []string{objRel}
	if t.delayedObjtool() {
		// With IBT (or clang LTO) kbuild runs objtool once over
		// vmlinux.o instead of per object, so a built-in object comes out
		// of make without objtool's rewrites (jump-label and fentry
		// NOPs). Forcing objtool-enabled makes kbuild run it on this
		// object with its own arguments plus --link, as it does for
		// single-object modules.
		args = append(args, "objtool-enabled=y")
	}
	if mode == FunctionSections {
		args = append(args, "KCFLAGS=-ffunction-sections -fdata-sections")
	}
	if out, err := t.make(ctx, args...); err != nil {
		return nil, fmt.Errorf("ksource: compiling %s: %w\n%s", rel, err, tail(out))
	}
	o, err := os.ReadFile(obj)
	if err != nil {
		return nil, fmt.Errorf("ksource: compiling %s: %w", rel, err)
	}
	return o, nil
}

// restoreJournal puts back a source file a Compile replaced, with its
// modification time, if a journal says one is replaced.
func (t *Tree) restoreJournal() error {
	p := filepath.Join(t.Dir, journalFile)
	js, err := os.ReadFile(p)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ksource: %w", err)
	}
	var j journal
	if err := json.Unmarshal(js, &j); err != nil {
		return fmt.Errorf("ksource: damaged %s (restore %s by hand): %w", p, "the file it names", err)
	}
	src, err := t.path(j.Rel)
	if err != nil {
		return err
	}
	if j.Content != nil {
		if err := os.WriteFile(src, j.Content, 0o644); err != nil {
			return fmt.Errorf("ksource: restoring %s: %w", j.Rel, err)
		}
		os.Chtimes(src, j.ModTime, j.ModTime)
	}
	if j.Object != "" && !j.HadObject {
		obj, err := t.path(j.Object)
		if err != nil {
			return err
		}
		os.Remove(obj)
		os.Remove(filepath.Join(filepath.Dir(obj), "."+filepath.Base(obj)+".cmd"))
	}
	return os.Remove(p)
}

func dirNames(dir string) (map[string]bool, error) {
	es, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("ksource: %w", err)
	}
	m := make(map[string]bool, len(es))
	for _, e := range es {
		m[e.Name()] = true
	}
	return m, nil
}

// delayedObjtool reports whether the tree's configuration makes kbuild delay
// objtool to the link of vmlinux.o.
func (t *Tree) delayedObjtool() bool {
	cfg, err := os.ReadFile(filepath.Join(t.Dir, ".config"))
	if err != nil {
		return false
	}
	if configValue(cfg, "CONFIG_X86_KERNEL_IBT") != "y" && configValue(cfg, "CONFIG_LTO_CLANG") != "y" {
		return false
	}
	// Kernels before the delay (6.1 and older) have no delay-objtool.
	mk, err := os.ReadFile(filepath.Join(t.Dir, "scripts/Makefile.lib"))
	return err == nil && strings.Contains(string(mk), "delay-objtool")
}
