// Package hostile makes a corpus of altered guest memory dumps from a clean
// one: each case is the clean dump with one structure a malicious guest (or
// a damaged file) controls changed the way issue 12 lists, found with
// hvpatch's own introspection of the clean dump (symbols, BTF, page tables,
// task and module lists, kallsyms tables) and patched in the dump's memory
// or, for the file's own headers, in its bytes.
//
// Memory cases are guest-physical edits, so the same cases can be planned
// against a live (paused) guest and written into its memory (PlanMemory),
// which is how hvpatchd is tested with them: its API takes no dump file.
package hostile

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
)

// DefaultTarget is the function sym and read are asked about.
const DefaultTarget = "version_proc_show"

// Edit is a change of guest-physical memory.
type Edit struct {
	GPA  uint64
	Data []byte
}

// FileEdit is a change of the dump file's bytes (headers, notes).
type FileEdit struct {
	Off  int64
	Data []byte
}

// Case is one altered dump.
type Case struct {
	Name string
	What string // what is altered, and what it once did to hvpatch

	Mem  []Edit     // guest memory: also applicable to a live guest
	File []FileEdit // the dump's own bytes
	// Cut, when set, truncates the file to CutAt bytes.
	Cut   bool
	CutAt int64

	// Target is the symbol sym and read ask about ("" = DefaultTarget).
	Target string
	// Markers are injected texts that must never begin a line of output
	// (a fake ps row, a fake "Release:" line).
	Markers []string
}

// TargetOrDefault is the symbol to ask sym and read about.
func (c Case) TargetOrDefault() string {
	if c.Target != "" {
		return c.Target
	}
	return DefaultTarget
}

// Corpus is the cases made from one clean dump.
type Corpus struct {
	Clean string
	Cases []Case
	// Kernel is the clean dump's kernel as introspect sees it.
	Kernel *introspect.Kernel
	// Notes says what the generator could not build (a structure the
	// kernel does not have), one line each.
	Notes []string

	loads []load
}

type load struct {
	gpa, size uint64
	off       int64
}

// Generate plans the corpus of the clean ELF dump at path (nothing is
// written: see Write and WriteAll).
func Generate(ctx context.Context, path string) (*Corpus, error) {
	d, err := hypervisor.OpenELFDump(path)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	mem, notes, err := PlanMemory(ctx, d, d.CPUs())
	if err != nil {
		return nil, fmt.Errorf("hostile: planning memory cases on %s: %w", path, err)
	}
	c := &Corpus{Clean: path, Notes: notes}
	c.Kernel = mem.Kernel
	c.Cases = mem.Cases
	if c.loads, err = readLoads(path); err != nil {
		return nil, err
	}
	fc, err := fileCases(path)
	if err != nil {
		return nil, err
	}
	c.Cases = append(c.Cases, fc...)
	return c, nil
}

// WriteAll writes every case to dir/NAME.elf and returns the paths.
func (c *Corpus) WriteAll(dir string) ([]string, error) {
	var out []string
	for _, cs := range c.Cases {
		p := dir + "/" + cs.Name + ".elf"
		if err := c.Write(cs, p); err != nil {
			return out, err
		}
		out = append(out, p)
	}
	return out, nil
}

// Write writes one case to path: the clean dump, sparse where it holds
// zero pages (a freshly booted guest's RAM is mostly zero), with the
// case's edits applied.
func (c *Corpus) Write(cs Case, path string) error {
	src, err := os.Open(c.Clean)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = sparseCopy(dst, src)
	for _, e := range cs.Mem {
		if err != nil {
			break
		}
		err = c.writeMem(dst, e)
	}
	for _, e := range cs.File {
		if err != nil {
			break
		}
		_, err = dst.WriteAt(e.Data, e.Off)
	}
	if err == nil && cs.Cut {
		err = dst.Truncate(cs.CutAt)
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("hostile: writing case %s to %s: %w", cs.Name, path, err)
	}
	return nil
}

func sparseCopy(dst *os.File, src *os.File) error {
	st, err := src.Stat()
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	zero := make([]byte, 4096)
	var off int64
	for {
		n, err := src.ReadAt(buf, off)
		for i := 0; i < n; i += 4096 {
			blk := buf[i:min(n, i+4096)]
			if len(blk) == 4096 && bytes.Equal(blk, zero) {
				continue
			}
			if _, err := dst.WriteAt(blk, off+int64(i)); err != nil {
				return err
			}
		}
		off += int64(n)
		if err == io.EOF || off >= st.Size() {
			break
		}
		if err != nil {
			return err
		}
	}
	return dst.Truncate(st.Size())
}

func (c *Corpus) writeMem(f *os.File, e Edit) error {
	for len(e.Data) > 0 {
		i := sort.Search(len(c.loads), func(i int) bool { return c.loads[i].gpa+c.loads[i].size > e.GPA })
		if i == len(c.loads) || e.GPA < c.loads[i].gpa {
			return fmt.Errorf("guest-physical %#x is not in the dump", e.GPA)
		}
		l := c.loads[i]
		n := min(uint64(len(e.Data)), l.gpa+l.size-e.GPA)
		if _, err := f.WriteAt(e.Data[:n], l.off+int64(e.GPA-l.gpa)); err != nil {
			return err
		}
		e.GPA += n
		e.Data = e.Data[n:]
	}
	return nil
}

func readLoads(path string) ([]load, error) {
	ef, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer ef.Close()
	var ls []load
	for _, p := range ef.Progs {
		if p.Type == elf.PT_LOAD && p.Filesz > 0 {
			ls = append(ls, load{p.Paddr, p.Filesz, int64(p.Off)})
		}
	}
	sort.Slice(ls, func(i, j int) bool { return ls[i].gpa < ls[j].gpa })
	return ls, nil
}

// Apply writes the case's memory edits into mem and returns the edits that
// undo them (the bytes that were there). Only memory cases apply.
func Apply(mem hypervisor.PhysMem, cs Case) ([]Edit, error) {
	if len(cs.File) > 0 || cs.Cut {
		return nil, fmt.Errorf("hostile: case %s alters the dump file, not memory", cs.Name)
	}
	var undo []Edit
	for _, e := range cs.Mem {
		old := make([]byte, len(e.Data))
		if err := mem.ReadPhys(e.GPA, old); err != nil {
			Restore(mem, undo)
			return nil, err
		}
		if err := mem.WritePhys(e.GPA, e.Data); err != nil {
			Restore(mem, undo)
			return nil, err
		}
		undo = append(undo, Edit{e.GPA, old})
	}
	return undo, nil
}

// Restore writes back what Apply returned, last edit first.
func Restore(mem hypervisor.PhysMem, undo []Edit) error {
	var errs []error
	for i := len(undo) - 1; i >= 0; i-- {
		errs = append(errs, mem.WritePhys(undo[i].GPA, undo[i].Data))
	}
	return errors.Join(errs...)
}

func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
