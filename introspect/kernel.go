// Package introspect finds a Linux guest kernel in guest-physical memory and
// reads it from the outside: page tables, the kernel image and its KASLR
// slide, kallsyms, BTF, tasks and modules. It needs only a
// hypervisor.PhysMem and the vCPU registers, so a live guest and an offline
// memory dump look the same to it.
package introspect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/symbols"
)

// x86-64 kernel layout constants (arch/x86/include/asm/page_64_types.h).
const (
	// KernelImageStart..KernelImageEnd is the region the kernel image is
	// mapped in (level2_kernel_pgt, 1 GiB with KASLR).
	KernelImageStart = 0xffffffff80000000
	KernelImageEnd   = 0xffffffffc0000000
	// DefaultText is _text without KASLR: __START_KERNEL_map plus
	// CONFIG_PHYSICAL_START (16 MiB on distribution kernels).
	DefaultText = 0xffffffff81000000

	defaultDirectMap4 = 0xffff888000000000
	defaultDirectMap5 = 0xff11000000000000
)

// Kernel is a guest kernel located in memory.
type Kernel struct {
	Mem  hypervisor.PhysMem
	AS   *AddressSpace // kernel page tables
	CR3  uint64        // kernel page-table root (PCID and PTI bits cleared)
	LA57 bool

	TextStart     uint64 // _text
	TextEnd       uint64 // _end
	PhysBase      uint64 // guest-physical address of _text
	Slide         uint64 // KASLR slide: _text - DefaultText
	DirectMapBase uint64 // page_offset_base: where the direct map of all RAM starts
	Banner        string // linux_banner, without the trailing newline
	Release       string // e.g. "6.1.0-56-cloud-amd64"

	Symbols *symbols.Table
	BTF     *btf.Spec // nil when the kernel has none

	AttachTime time.Duration // how long Open took
	Timings    Timings

	// WalkBudget bounds each walk of guest lists (Tasks, Modules); zero
	// means DefaultWalkBudget.
	WalkBudget Budget

	fieldMu sync.Mutex
	fields  map[string]Field
}

// Timings are the phases of Open.
type Timings struct {
	Locate   time.Duration // page-table scan for the kernel image
	Read     time.Duration // copying the image out of guest memory
	Kallsyms time.Duration // decoding the symbol table
	BTF      time.Duration // parsing BTF
}

func (t Timings) String() string {
	return fmt.Sprintf("locate %v, read %v, kallsyms %v, btf %v", t.Locate, t.Read, t.Kallsyms, t.BTF)
}

// Limits on what Open believes of a guest, whatever its page tables and
// symbols say. Distribution kernels are 30-70 MiB from _text to _end and
// carry 5-6 MiB of BTF.
const (
	maxImageRead = 512 << 20 // bytes of the kernel image read
	maxBTFSize   = 64 << 20  // bytes of .BTF
)

// Open locates the kernel through the first vCPU's page tables, decodes
// its kallsyms and parses its BTF. cpus come from the monitor (live) or the
// dump's notes (offline). It runs under DefaultAttachBudget.
func Open(ctx context.Context, mem hypervisor.PhysMem, cpus []hypervisor.CPUState) (*Kernel, error) {
	return OpenWithBudget(ctx, mem, cpus, DefaultAttachBudget)
}

// OpenWithBudget is Open with its own budget (a zero Budget means
// DefaultAttachBudget). A guest whose memory makes the attach cost more
// gets a *BudgetError.
func OpenWithBudget(ctx context.Context, mem hypervisor.PhysMem, cpus []hypervisor.CPUState, b Budget) (*Kernel, error) {
	b = orDefault(b, DefaultAttachBudget)
	if b.Time > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, b.Time)
		defer cancel()
	}
	bm := newBudgetMem(mem, "attach", b)
	k, err := open(ctx, bm, cpus)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && b.Time > 0 && time.Since(bm.start) >= b.Time {
			err = errors.Join(&BudgetError{Op: "attach", What: "time", Limit: b.Time.String()}, err)
		}
		return nil, err
	}
	// Later reads are not the attach's: they go to the memory itself.
	k.Mem = mem
	k.AS = NewAddressSpace(mem, k.CR3, k.LA57)
	return k, nil
}

func open(ctx context.Context, mem *budgetMem, cpus []hypervisor.CPUState) (*Kernel, error) {
	t0 := time.Now()
	if len(cpus) == 0 {
		return nil, errors.New("introspect: no vCPU state given: need at least one CR3")
	}
	k := &Kernel{Mem: mem, fields: map[string]Field{}}

	maps, err := k.locate(cpus)
	if err != nil {
		return nil, err
	}
	k.Timings.Locate = time.Since(t0)
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	t1 := time.Now()
	imgEnd := maps[len(maps)-1].VA + maps[len(maps)-1].Size
	// kallsyms, BTF and the banner all live in .rodata, which after boot is
	// the one large read-only, non-executable run of the image: reading
	// just that is a fifth of the image. Should it not decode (a kernel
	// still booting, an unusual layout), fall back to the whole image.
	var img []byte
	var imgBase uint64
	if ro := rodataRun(maps); ro.Size >= Size2M {
		imgBase = ro.VA
		img, err = k.readImage(mem, maps, ro.VA, ro.VA+ro.Size)
		if err != nil {
			return nil, err
		}
		k.Timings.Read = time.Since(t1)
		t2 := time.Now()
		if k.Symbols, err = symbols.DecodeKallsymsContext(ctx, img, imgBase); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("introspect: decoding kallsyms: %w", err)
			}
			k.Symbols = nil
		}
		k.Timings.Kallsyms = time.Since(t2)
	}
	if k.Symbols == nil {
		t1 = time.Now()
		imgBase = k.TextStart
		img = nil // the .rodata copy: let it go before the larger read
		if img, err = k.readImage(mem, maps, k.TextStart, imgEnd); err != nil {
			return nil, err
		}
		k.Timings.Read += time.Since(t1)
		t2 := time.Now()
		k.Symbols, err = symbols.DecodeKallsymsContext(ctx, img, imgBase)
		if err != nil {
			return nil, fmt.Errorf("introspect: decoding kallsyms of the kernel at %#x: %w", k.TextStart, err)
		}
		k.Timings.Kallsyms += time.Since(t2)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := k.checkImage(img, imgBase, imgEnd); err != nil {
		return nil, err
	}
	k.useInitPGD()

	t3 := time.Now()
	if err := k.loadBTF(img, imgBase); err != nil {
		return nil, err
	}
	k.Timings.BTF = time.Since(t3)
	k.AttachTime = time.Since(t0)
	return k, nil
}

// locate picks the kernel page tables and finds the kernel image in them.
// Under PTI a vCPU in user mode runs on the user copy of the PGD, which maps
// only the entry code; so both the CR3 as found and its kernel twin are
// tried, on every vCPU, and the one mapping the most of the image wins.
func (k *Kernel) locate(cpus []hypervisor.CPUState) ([]Mapping, error) {
	var best []Mapping
	var bestSize uint64
	var errs []error
	seen := map[uint64]bool{}
	for _, cpu := range cpus {
		if cpu.CR0&(1<<31) == 0 {
			errs = append(errs, fmt.Errorf("vCPU %d has paging off (CR0 %#x)", cpu.Index, cpu.CR0))
			continue
		}
		la57 := cpu.CR4&hypervisor.CR4LA57 != 0
		for _, root := range []uint64{KernelCR3(cpu.CR3), cpu.CR3 & pteAddrMask} {
			if seen[root] {
				continue
			}
			seen[root] = true
			as := NewAddressSpace(k.Mem, root, la57)
			maps, err := as.Mappings(KernelImageStart, KernelImageEnd)
			if err != nil {
				errs = append(errs, fmt.Errorf("vCPU %d CR3 %#x: %w", cpu.Index, root, err))
				continue
			}
			var size uint64
			for _, m := range maps {
				size += m.Size
			}
			if size > bestSize {
				best, bestSize = maps, size
				k.AS, k.CR3, k.LA57 = as, root, la57
			}
		}
	}
	if bestSize < Size2M {
		err := fmt.Errorf("introspect: no kernel image mapped at %#x-%#x under any vCPU's CR3 (%d vCPUs)",
			uint64(KernelImageStart), uint64(KernelImageEnd), len(cpus))
		if len(errs) > 0 {
			err = fmt.Errorf("%w: %w", err, errors.Join(errs...))
		}
		return nil, err
	}
	k.TextStart = best[0].VA
	k.PhysBase = best[0].GPA
	k.Slide = k.TextStart - DefaultText
	return best, nil
}

// rodataRun is the largest run of virtually contiguous mappings that are
// read-only and not executable.
func rodataRun(maps []Mapping) Mapping {
	var best, cur Mapping
	for _, m := range maps {
		if m.Writable || !m.NX {
			cur = Mapping{}
			continue
		}
		if cur.Size > 0 && cur.VA+cur.Size == m.VA {
			cur.Size += m.Size
		} else {
			cur = Mapping{VA: m.VA, Size: m.Size}
		}
		if cur.Size > best.Size {
			best = cur
		}
	}
	return best
}

// readImage copies [start, end) of the kernel image out of guest memory,
// one read per mapping (2 MiB pages make that a few dozen reads). Holes,
// where init memory was freed and unmapped, stay zero.
func (k *Kernel) readImage(mem *budgetMem, maps []Mapping, start, end uint64) ([]byte, error) {
	size := end - start
	if end < start || size > KernelImageEnd-KernelImageStart {
		return nil, fmt.Errorf("introspect: kernel image range %#x-%#x is not within its region", start, end)
	}
	if size > maxImageRead {
		return nil, fmt.Errorf("introspect: kernel image range %#x-%#x is %d MiB, more than the %d MiB a kernel image has", start, end, size>>20, maxImageRead>>20)
	}
	if err := mem.check(size); err != nil {
		return nil, err
	}
	img := make([]byte, size)
	for _, m := range maps {
		lo, hi := max(m.VA, start), min(m.VA+m.Size, end)
		if lo >= hi {
			continue
		}
		gpa := m.GPA + (lo - m.VA)
		if err := k.Mem.ReadPhys(gpa, img[lo-start:hi-start]); err != nil {
			// A mapping of non-RAM inside the image is not the kernel's;
			// leave it zero rather than fail the whole attach.
			var ae *hypervisor.AccessError
			if errors.As(err, &ae) {
				continue
			}
			return nil, fmt.Errorf("introspect: reading kernel image at %#x (guest-physical %#x): %w", lo, gpa, err)
		}
	}
	return img, nil
}

var bannerRE = regexp.MustCompile(`Linux version (\S+) \(`)

// checkImage cross-checks the page-table view with kallsyms and reads the
// banner and the direct-map base.
// img holds kernel memory from imgBase; imgEnd is the end of the mapped image.
func (k *Kernel) checkImage(img []byte, imgBase, imgEnd uint64) error {
	text, err := k.Symbols.Addr("_text")
	if err != nil {
		return fmt.Errorf("introspect: kallsyms has no _text: %w", err)
	}
	if text != k.TextStart {
		return fmt.Errorf("introspect: kallsyms _text %#x differs from the first mapped page of the kernel image %#x", text, k.TextStart)
	}
	k.TextEnd = imgEnd
	if end, err := k.Symbols.Addr("_end"); err == nil {
		if end < k.TextStart || end > imgEnd {
			return fmt.Errorf("introspect: kallsyms _end %#x lies outside the mapped image %#x-%#x", end, k.TextStart, imgEnd)
		}
		k.TextEnd = end
	}

	// linux_banner is the authority; a scan of the image is the fallback
	// for kernels whose kallsyms lacks data symbols.
	banner := ""
	if at, err := k.Symbols.Addr("linux_banner"); err == nil && at >= imgBase && at-imgBase < uint64(len(img)) {
		b := img[at-imgBase:]
		if i := bytes.IndexByte(b[:min(len(b), 1024)], 0); i > 0 {
			banner = string(b[:i])
		}
	}
	if !bannerRE.MatchString(banner) {
		if loc := bannerRE.FindIndex(img); loc != nil {
			end := bytes.IndexByte(img[loc[0]:], 0)
			if end < 0 || end > 1024 {
				end = min(1024, len(img)-loc[0])
			}
			banner = string(img[loc[0] : loc[0]+end])
		}
	}
	k.Banner = strings.TrimRight(banner, "\n")
	if m := bannerRE.FindStringSubmatch(k.Banner); m != nil {
		k.Release = m[1]
	} else {
		return fmt.Errorf("introspect: no \"Linux version\" banner in the kernel image at %#x", k.TextStart)
	}

	k.DirectMapBase = defaultDirectMap4
	if k.LA57 {
		k.DirectMapBase = defaultDirectMap5
	}
	// With RANDOMIZE_MEMORY the base is a variable; read it live, it is
	// set once during boot.
	if at, err := k.Symbols.Addr("page_offset_base"); err == nil {
		v, err := k.AS.ReadUint64(at)
		if err != nil {
			return fmt.Errorf("introspect: reading page_offset_base at %#x: %w", at, err)
		}
		k.DirectMapBase = v
	}
	return nil
}

// useInitPGD switches to the kernel's own top-level table, init_top_pgt
// (swapper_pg_dir). The CR3 a vCPU happened to hold may be a process's PGD,
// freed and reused once that process exits; init_top_pgt lives as long as
// the kernel, and holds the same kernel mappings (the vmalloc and module
// PGD entries are preallocated and shared on x86-64).
func (k *Kernel) useInitPGD() {
	at, err := k.Symbols.Addr("init_top_pgt")
	if err != nil {
		return
	}
	tr, err := k.AS.Translate(at)
	if err != nil || tr.GPA&(Size4K-1) != 0 {
		return
	}
	as := NewAddressSpace(k.Mem, tr.GPA, k.LA57)
	if t, err := as.Translate(k.TextStart); err != nil || t.GPA != k.PhysBase {
		return // not what it should be; keep the vCPU's tables
	}
	k.AS, k.CR3 = as, tr.GPA
}

// loadBTF parses the kernel's .BTF section, [__start_BTF, __stop_BTF).
func (k *Kernel) loadBTF(img []byte, imgBase uint64) error {
	start, err1 := k.Symbols.Addr("__start_BTF")
	stop, err2 := k.Symbols.Addr("__stop_BTF")
	if err1 != nil || err2 != nil {
		return nil // no BTF in this kernel
	}
	if stop < start || stop-start > maxBTFSize {
		return fmt.Errorf("introspect: BTF range %#x-%#x is not a range of at most %d MiB", start, stop, maxBTFSize>>20)
	}
	var raw []byte
	if start >= imgBase && stop-imgBase <= uint64(len(img)) {
		// A private copy, so the large image buffer can be freed.
		raw = bytes.Clone(img[start-imgBase : stop-imgBase])
	} else {
		raw = make([]byte, stop-start)
		if err := k.AS.ReadVirt(start, raw); err != nil {
			return fmt.Errorf("introspect: reading BTF at %#x: %w", start, err)
		}
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("introspect: parsing BTF at %#x (%d bytes): %w", start, len(raw), err)
	}
	k.BTF = spec
	return nil
}

// Field resolves a BTF member path (see FieldOf), cached per kernel.
func (k *Kernel) Field(path string) (Field, error) {
	k.fieldMu.Lock()
	f, ok := k.fields[path]
	k.fieldMu.Unlock()
	if ok {
		return f, nil
	}
	f, err := FieldOf(k.BTF, path)
	if err != nil {
		return Field{}, err
	}
	k.fieldMu.Lock()
	if k.fields == nil || len(k.fields) >= maxCachedFields {
		k.fields = map[string]Field{}
	}
	k.fields[path] = f
	k.fieldMu.Unlock()
	return f, nil
}

// maxCachedFields bounds the field cache (callers use a few dozen paths).
const maxCachedFields = 1024

// walkAS is the kernel's address space with reads charged to a fresh
// WalkBudget: one per walk of guest lists.
func (k *Kernel) walkAS(op string) *AddressSpace {
	if k.Mem == nil || k.AS == nil {
		return k.AS
	}
	return NewAddressSpace(newBudgetMem(k.Mem, op, orDefault(k.WalkBudget, DefaultWalkBudget)), k.AS.Root(), k.AS.LA57())
}

// Offset is the byte offset of a member path, e.g. "task_struct.tasks".
func (k *Kernel) Offset(path string) (uint64, error) {
	f, err := k.Field(path)
	return f.Offset, err
}

// SymbolAddr is the address of a kernel symbol.
func (k *Kernel) SymbolAddr(name string) (uint64, error) {
	return k.Symbols.Addr(name)
}

// DirectMapToPhys converts a direct-map virtual address (what kmalloc and
// page_address return) to guest-physical without walking page tables.
func (k *Kernel) DirectMapToPhys(va uint64) (uint64, error) {
	if va < k.DirectMapBase {
		return 0, fmt.Errorf("address %#x is below the direct map at %#x", va, k.DirectMapBase)
	}
	pa := va - k.DirectMapBase
	for _, r := range k.Mem.Regions() {
		if pa >= r.GPA && pa < r.End() {
			return pa, nil
		}
	}
	return 0, fmt.Errorf("address %#x is not in the direct map of guest RAM", va)
}

// PagingMode is "4-level" or "5-level".
func (k *Kernel) PagingMode() string {
	if k.LA57 {
		return "5-level"
	}
	return "4-level"
}
