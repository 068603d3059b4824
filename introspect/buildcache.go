package introspect

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/symbols"
)

// BuildCache shares what is the same in every guest running one kernel
// build (the same build id): the symbol table and the parsed BTF. Guests of
// one build differ only by their KASLR slide, and a symbol table moved by a
// slide is a view of the cached one (symbols.Table.WithSlide), so a further
// guest of a seen build costs a page-table scan, a read of the kernel's
// notes and a few checks, not the decoding of kallsyms and BTF, and holds a
// few kilobytes instead of tens of megabytes. It is safe for concurrent
// use; BTF specs are shared read-only (cilium/ebpf's Spec guards its lazy
// decoding with a mutex).
type BuildCache struct {
	// Max bounds the builds kept (least recently used first out); zero
	// means 8.
	Max int

	mu      sync.Mutex
	entries []*buildEntry // most recently used first
	// load is held while a kernel is opened in full, so that guests
	// attached at once (a daemon starting beside many guests of one
	// build) decode the build once: the others wait, then hit.
	load sync.Mutex

	hits, misses atomic.Int64
}

type buildEntry struct {
	id       string
	notesOff uint64 // __start_notes - _text
	notesLen uint64
	slide    uint64 // the slide of the kernel syms are for
	syms     *symbols.Table
	spec     *btf.Spec
	banner   string
	release  string
	endOff   uint64 // _end - _text
}

// CacheStats are a BuildCache's counters.
type CacheStats struct {
	Builds       int
	Hits, Misses int64
}

// Stats reports how many builds the cache holds and how often it was used.
func (c *BuildCache) Stats() CacheStats {
	c.mu.Lock()
	n := len(c.entries)
	c.mu.Unlock()
	return CacheStats{Builds: n, Hits: c.hits.Load(), Misses: c.misses.Load()}
}

// OpenCached is Open through a BuildCache (nil: plain Open). A kernel whose
// build the cache holds gets the cached symbols (moved by its own slide)
// and BTF; any other is opened in full and added.
func OpenCached(ctx context.Context, mem hypervisor.PhysMem, cpus []hypervisor.CPUState, c *BuildCache) (*Kernel, error) {
	if c == nil {
		return Open(ctx, mem, cpus)
	}
	t0 := time.Now()
	if k := c.lookup(mem, cpus, t0); k != nil {
		return k, nil
	}
	c.load.Lock()
	defer c.load.Unlock()
	if k := c.lookup(mem, cpus, t0); k != nil { // opened meanwhile by another
		return k, nil
	}
	c.misses.Add(1)
	k, err := Open(ctx, mem, cpus)
	if err != nil {
		return nil, err
	}
	c.add(k)
	return k, nil
}

// lookup opens the kernel from a cached build, or returns nil.
func (c *BuildCache) lookup(mem hypervisor.PhysMem, cpus []hypervisor.CPUState, t0 time.Time) *Kernel {
	if len(cpus) == 0 {
		return nil
	}
	k := &Kernel{Mem: newBudgetMem(mem, "attach", DefaultAttachBudget), fields: map[string]Field{}}
	if _, err := k.locate(cpus); err != nil {
		return nil
	}
	k.Timings.Locate = time.Since(t0)
	e := c.match(k)
	if e == nil {
		return nil
	}
	k.Mem = mem
	k.AS = NewAddressSpace(mem, k.CR3, k.LA57)
	if e.fill(k) != nil {
		return nil
	}
	c.hits.Add(1)
	k.AttachTime = time.Since(t0)
	return k
}

// match finds the cached build whose notes, read at their offset from this
// kernel's _text, carry the cached build id.
func (c *BuildCache) match(k *Kernel) *buildEntry {
	c.mu.Lock()
	entries := append([]*buildEntry(nil), c.entries...)
	c.mu.Unlock()
	for _, e := range entries {
		notes := make([]byte, e.notesLen)
		if k.AS.ReadVirt(k.TextStart+e.notesOff, notes) != nil {
			continue
		}
		if id, err := parseBuildIDNote(notes); err == nil && id == e.id {
			c.touch(e)
			return e
		}
	}
	return nil
}

func (c *BuildCache) touch(e *buildEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.entries {
		if x == e {
			copy(c.entries[1:i+1], c.entries[:i])
			c.entries[0] = e
			return
		}
	}
}

// fill completes k (located) from the cached build, checking that the
// guest's banner is the build's where the moved symbols say it is.
func (e *buildEntry) fill(k *Kernel) error {
	delta := k.Slide - e.slide
	syms := e.syms.WithSlide(delta)
	if text, err := syms.Addr("_text"); err != nil || text != k.TextStart {
		return fmt.Errorf("introspect: cached build %s: _text does not match", e.id)
	}
	at, err := syms.Addr("linux_banner")
	if err != nil {
		return err
	}
	b := make([]byte, len(e.banner))
	if err := k.AS.ReadVirt(at, b); err != nil || string(b) != e.banner {
		return fmt.Errorf("introspect: cached build %s: banner differs", e.id)
	}
	k.Symbols, k.BTF = syms, e.spec
	k.TextEnd = k.TextStart + e.endOff
	k.Banner, k.Release = e.banner, e.release
	k.DirectMapBase = defaultDirectMap4
	if k.LA57 {
		k.DirectMapBase = defaultDirectMap5
	}
	if at, err := k.Symbols.Addr("page_offset_base"); err == nil {
		v, err := k.AS.ReadUint64(at)
		if err != nil {
			return err
		}
		k.DirectMapBase = v
	}
	k.useInitPGD()
	return nil
}

// add caches k's build when it has a build id.
func (c *BuildCache) add(k *Kernel) {
	start, err1 := k.Symbols.Addr("__start_notes")
	stop, err2 := k.Symbols.Addr("__stop_notes")
	if err1 != nil || err2 != nil || stop <= start || stop-start > 1<<16 || start < k.TextStart || k.TextEnd < k.TextStart {
		return
	}
	notes := make([]byte, stop-start)
	if k.AS.ReadVirt(start, notes) != nil {
		return
	}
	id, err := parseBuildIDNote(notes)
	if err != nil || id == "" {
		return
	}
	e := &buildEntry{id: id, notesOff: start - k.TextStart, notesLen: stop - start, slide: k.Slide,
		syms: k.Symbols, spec: k.BTF, banner: k.Banner, release: k.Release, endOff: k.TextEnd - k.TextStart}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, x := range c.entries {
		if x.id == id {
			return
		}
	}
	c.entries = append([]*buildEntry{e}, c.entries...)
	max := c.Max
	if max <= 0 {
		max = 8
	}
	if len(c.entries) > max {
		c.entries = c.entries[:max]
	}
}

// parseBuildIDNote returns the NT_GNU_BUILD_ID descriptor, in hex, of a
// sequence of ELF notes ("" when there is none).
func parseBuildIDNote(notes []byte) (string, error) {
	const ntGNUBuildID = 3
	align := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for off := uint64(0); off+12 <= uint64(len(notes)); {
		namesz := uint64(binary.LittleEndian.Uint32(notes[off:]))
		descsz := uint64(binary.LittleEndian.Uint32(notes[off+4:]))
		typ := binary.LittleEndian.Uint32(notes[off+8:])
		name := off + 12
		if namesz > uint64(len(notes)) || descsz > uint64(len(notes)) {
			return "", fmt.Errorf("note at %#x runs past the end", off)
		}
		desc := name + align(namesz)
		next := desc + align(descsz)
		if next > uint64(len(notes)) {
			return "", fmt.Errorf("note at %#x runs past the end", off)
		}
		if typ == ntGNUBuildID && namesz == 4 && string(notes[name:name+4]) == "GNU\x00" && descsz > 0 {
			return hex.EncodeToString(notes[desc : desc+descsz]), nil
		}
		off = next
	}
	return "", nil
}
