package patcher

import (
	"context"
	"fmt"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// KernelTarget is a Target over a guest kernel found by introspect.
type KernelTarget struct{ K *introspect.Kernel }

func (t KernelTarget) Release() string { return t.K.Release }

func (t KernelTarget) Symbols(name string) []Symbol {
	var out []Symbol
	for _, s := range t.K.Symbols.Lookup(name) {
		if s.Module != "" {
			continue
		}
		size := uint64(0)
		if symbols.IsText(s.Type) {
			size = t.K.Symbols.FunctionSize(s)
		}
		out = append(out, Symbol{Name: s.Name, Addr: s.Addr, Size: size})
	}
	return out
}

// ModuleSymbols reads the loaded modules' symbol tables from guest memory
// (introspect.Kernel.ModuleSymbols) and returns those of one module with
// that name; a function's size reaches to the module's next symbol.
func (t KernelTarget) ModuleSymbols(module, name string) ([]Symbol, error) {
	mods, err := t.K.Modules()
	if err != nil {
		return nil, err
	}
	loaded := false
	for _, m := range mods {
		loaded = loaded || m.Name == module
	}
	if !loaded {
		return nil, fmt.Errorf("module %s is not loaded in the guest", module)
	}
	all, err := t.K.ModuleSymbols()
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", module, err)
	}
	var own []symbols.Symbol
	for _, s := range all {
		if s.Module == module {
			own = append(own, s)
		}
	}
	tab := symbols.NewTable(own)
	var out []Symbol
	for _, s := range tab.Lookup(name) {
		size := uint64(0)
		if symbols.IsText(s.Type) {
			size = tab.FunctionSize(s)
		}
		out = append(out, Symbol{Name: s.Name, Addr: s.Addr, Size: size})
	}
	return out, nil
}

// LoadedModules walks the guest's module list.
func (t KernelTarget) LoadedModules() ([]LoadedModule, error) {
	mods, err := t.K.Modules()
	if err != nil {
		return nil, err
	}
	out := make([]LoadedModule, len(mods))
	for i, m := range mods {
		out[i] = LoadedModule{Name: m.Name, Base: m.Base, Settled: m.Settled}
	}
	return out, nil
}

func (t KernelTarget) Describe(addr uint64) string {
	s, off, ok := t.K.Symbols.Resolve(addr)
	if !ok {
		return ""
	}
	return fmt.Sprintf("%s+%#x", s.Name, off)
}

func (t KernelTarget) ReadVirt(va uint64, p []byte) error { return t.K.AS.ReadVirt(va, p) }

func (t KernelTarget) Translate(va uint64) (uint64, uint64, error) {
	tr, err := t.K.AS.Translate(va)
	if err != nil {
		return 0, 0, err
	}
	return tr.GPA, tr.PageSize, nil
}

// Live is a running libvirt domain opened for patching.
type Live struct {
	Domain
	HV     *hypervisor.Domain
	Mem    hypervisor.PhysMem
	Kernel *introspect.Kernel
}

// OpenLive maps the domain's memory, finds its kernel and prepares the code
// writer named writerKind (hypervisor.ParseWriter: auto, or "", picks from
// the accelerator: gdbstub on TCG, direct+ptrace on KVM).
func OpenLive(ctx context.Context, hv *hypervisor.Domain, writerKind string) (*Live, error) {
	return OpenLiveCached(ctx, hv, writerKind, nil)
}

// OpenLiveCached is OpenLive with the kernel's symbols and BTF shared
// through cache with other guests of the same build (nil: not shared).
func OpenLiveCached(ctx context.Context, hv *hypervisor.Domain, writerKind string, cache *introspect.BuildCache) (*Live, error) {
	mem, err := hv.OpenPhysMem(ctx, "")
	if err != nil {
		return nil, err
	}
	cpus, err := hv.CPUs(ctx)
	if err != nil {
		mem.Close()
		return nil, err
	}
	k, err := introspect.OpenCached(ctx, mem, cpus, cache)
	if err != nil {
		mem.Close()
		return nil, fmt.Errorf("domain %s: %w", hv.Name(), err)
	}
	w, err := hv.NewCodeWriter(ctx, writerKind, mem)
	if err != nil {
		mem.Close()
		return nil, err
	}
	l := &Live{
		Domain: Domain{Name: hv.Name(), UUID: hv.UUID(), Target: KernelTarget{k}, Writer: w},
		HV:     hv, Mem: mem, Kernel: k,
	}
	if l.RegisterWriter, err = l.registerWriter(ctx, w); err != nil {
		mem.Close()
		return nil, err
	}
	return l, nil
}

// registerWriter is the writer for what needs the vCPU registers during a
// stop when w's stops cannot read them (a ptrace freeze): direct writes
// under a libvirt suspend, which lets the monitor be asked. nil when w can.
func (l *Live) registerWriter(ctx context.Context, w CodeWriter) (CodeWriter, error) {
	if w.Capabilities().Registers {
		return nil, nil
	}
	return l.HV.NewCodeWriter(ctx, hypervisor.WriterDirectSuspend, l.Mem)
}

// Close releases the guest memory mapping.
func (l *Live) Close() error { return l.Mem.Close() }

// WithWriter returns the same domain written through another writer
// (a name of hypervisor.WriterNames).
func (l *Live) WithWriter(ctx context.Context, kind string) (Domain, error) {
	w, err := l.HV.NewCodeWriter(ctx, kind, l.Mem)
	if err != nil {
		return Domain{}, err
	}
	d := l.Domain
	d.Writer = w
	if d.RegisterWriter, err = l.registerWriter(ctx, w); err != nil {
		return Domain{}, err
	}
	return d, nil
}
