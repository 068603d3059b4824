package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Writer names: the one vocabulary of the CLI's --writer flag, hvpatchd's
// writer setting and the docs. ParseWriter is the only place that reads
// them.
const (
	// WriterAuto picks from the accelerator: gdbstub under TCG,
	// direct+ptrace under KVM.
	WriterAuto = "auto"
	// WriterGdbstub writes through QEMU's gdbstub, which holds the whole
	// VM (vm_stop) and invalidates translated code: needed under TCG.
	WriterGdbstub = "gdbstub"
	// WriterDirectPtrace writes guest RAM while every vCPU thread is held
	// by ptrace: the shortest stop, KVM only; the monitor must not be
	// called during it, so vCPU registers cannot be read.
	WriterDirectPtrace = "direct+ptrace"
	// WriterDirectSuspend writes guest RAM while libvirt has suspended the
	// VM: longer, but vCPU registers are readable during the stop.
	WriterDirectSuspend = "direct+suspend"
)

// WriterNames lists the writer names in the order the docs give them.
var WriterNames = []string{WriterAuto, WriterGdbstub, WriterDirectPtrace, WriterDirectSuspend}

// ParseWriter checks a writer name and returns it in canonical form
// (lower case; "" means auto). It is the one validation of writer names for
// the CLI, hvpatchd's configuration and NewCodeWriter.
func ParseWriter(s string) (string, error) {
	n := strings.ToLower(strings.TrimSpace(s))
	if n == "" {
		return WriterAuto, nil
	}
	for _, w := range WriterNames {
		if n == w {
			return w, nil
		}
	}
	hint := ""
	if n == "direct" {
		hint = " (say direct+ptrace or direct+suspend: the name says how the vCPUs are stopped)"
	}
	return "", fmt.Errorf("unknown code writer %q%s: want one of %s", s, hint, strings.Join(WriterNames, ", "))
}

// ErrNoRegisters is what StoppedGuest.Registers returns when the stop
// cannot read the vCPUs' registers (a ptrace freeze: the monitor would
// need the vCPU threads that are held).
var ErrNoRegisters = errors.New("the vCPU registers cannot be read during this writer's stop (a ptrace freeze must not call the QEMU monitor); use the gdbstub or direct+suspend writer")

// CodeWriter stops every vCPU, lets the caller read and write guest memory,
// and resumes. It is the one code-writer abstraction: the patcher, the code
// area and hvpatchd all use it, wrappers embed it, and what a writer can do
// is asked through Capabilities, never by its name.
type CodeWriter interface {
	// Name is the writer's name in the WriterNames vocabulary (never auto).
	Name() string
	// Capabilities says what the writer's stops allow.
	Capabilities() Capabilities
	Stop(ctx context.Context) (StoppedGuest, error)
}

// Capabilities describes a writer's stops.
type Capabilities struct {
	// Registers: StoppedGuest.Registers works during the stop (the VM is
	// stopped the way the monitor stops it, so the monitor may be asked).
	Registers bool
	// OutlivesProcess: a stop is not ended by the death of the process
	// holding it (a libvirt suspend; the gdbstub's guard resumes, but a
	// daemon keeps a marker as a second line of defence). A ptrace freeze
	// ends when its tracer dies.
	OutlivesProcess bool
}

// StoppedGuest is a guest whose vCPUs are all stopped. Resume must be
// called exactly once.
type StoppedGuest interface {
	// Read/Write take both the kernel virtual address and its
	// guest-physical address (the caller translated it); the direct writer
	// uses gpa, the gdbstub writer va.
	Read(va, gpa uint64, p []byte) error
	Write(va, gpa uint64, data []byte) error
	// Registers reads every vCPU's registers during the stop; it returns
	// ErrNoRegisters when the writer's Capabilities().Registers is false.
	Registers(ctx context.Context) ([]CPUState, error)
	// Resume lets the vCPUs run again and reports how long they were stopped.
	Resume() (FreezeReport, error)
}

// FreezeReport says how long the vCPUs were stopped, and how.
type FreezeReport struct {
	Window time.Duration
	Method string // "ptrace", "suspend", "gdbstub"
	VCPUs  int
}

// NewCodeWriter picks how code changes reach the guest; kind is a writer
// name (ParseWriter; "" is auto). auto chooses from the accelerator: KVM
// executes guest RAM as is, so a direct write under a ptrace freeze is
// seen; TCG runs translations of it that only QEMU's own writes (the
// gdbstub) invalidate. mem is needed by the direct writers.
func (d *Domain) NewCodeWriter(ctx context.Context, kind string, mem PhysMem) (CodeWriter, error) {
	kind, err := ParseWriter(kind)
	if err != nil {
		return nil, err
	}
	if kind == WriterAuto {
		acc, err := d.Accel(ctx)
		if err != nil {
			return nil, err
		}
		kind = map[string]string{"kvm": WriterDirectPtrace, "tcg": WriterGdbstub}[acc]
		if kind == "" {
			return nil, fmt.Errorf("domain %s: accelerator %q: no automatic writer; name one (%s)", d.Name(), acc, strings.Join(WriterNames[1:], ", "))
		}
	}
	switch kind {
	case WriterDirectPtrace, WriterDirectSuspend:
		if mem == nil {
			return nil, fmt.Errorf("domain %s: the %s writer needs guest memory (PhysMem)", d.Name(), kind)
		}
		freezer := "ptrace"
		if kind == WriterDirectSuspend {
			freezer = "suspend"
		}
		return &directWriter{d: d, mem: mem, freezer: freezer}, nil
	default: // WriterGdbstub
		tids, err := d.VCPUThreads(ctx)
		if err != nil {
			return nil, err
		}
		return &gdbWriter{d: d, vcpus: len(tids)}, nil
	}
}

// directWriter writes guest RAM through PhysMem while a Freezer holds
// every vCPU.
type directWriter struct {
	d       *Domain
	mem     PhysMem
	freezer string
	vcpus   vcpuCache
}

func (w *directWriter) Name() string { return "direct+" + w.freezer }

func (w *directWriter) Capabilities() Capabilities {
	suspend := w.freezer == "suspend"
	return Capabilities{Registers: suspend, OutlivesProcess: suspend}
}

func (w *directWriter) Stop(ctx context.Context) (StoppedGuest, error) {
	// Thread ids come from the monitor (before freezing: it must not be
	// called while vCPU threads are stopped) and are kept while the same
	// QEMU process has the same vCPU threads (vcpuCache).
	pid, tids, err := w.vcpus.get(ctx, w.d)
	if err != nil {
		return nil, err
	}
	var f Freezer = w.d.SuspendFreezer()
	if w.freezer == "ptrace" {
		f = newPtraceFreezer(w.d.Name(), pid, tids)
	}
	fz, err := f.Freeze(ctx)
	if err != nil {
		return nil, err
	}
	return &directStopped{d: w.d, mem: w.mem, fz: fz, method: f.Name(), vcpus: len(tids), regs: w.Capabilities().Registers}, nil
}

type directStopped struct {
	d      *Domain
	mem    PhysMem
	regs   bool // the monitor may be asked during the stop
	fz     Frozen
	method string
	vcpus  int
	done   bool
}

func (s *directStopped) Read(va, gpa uint64, p []byte) error  { return s.mem.ReadPhys(gpa, p) }
func (s *directStopped) Write(va, gpa uint64, p []byte) error { return s.mem.WritePhys(gpa, p) }

func (s *directStopped) Registers(ctx context.Context) ([]CPUState, error) {
	if !s.regs {
		return nil, ErrNoRegisters
	}
	return s.d.CPUs(ctx)
}

func (s *directStopped) Resume() (FreezeReport, error) {
	if s.done {
		return FreezeReport{}, errors.New("already resumed")
	}
	s.done = true
	w, err := s.fz.Thaw()
	return FreezeReport{Window: w, Method: s.method, VCPUs: s.vcpus}, err
}
