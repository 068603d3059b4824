package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// CodeWriter stops every vCPU, lets the caller read and write guest memory,
// and resumes.
type CodeWriter interface {
	Name() string // "direct+ptrace", "direct+suspend", "gdbstub"
	Stop(ctx context.Context) (StoppedGuest, error)
}

// StoppedGuest is a guest whose vCPUs are all stopped.
type StoppedGuest interface {
	// Read/Write take both the kernel virtual address and its
	// guest-physical address (the caller translated it); the direct writer
	// uses gpa, the gdbstub writer va.
	Read(va, gpa uint64, p []byte) error
	Write(va, gpa uint64, data []byte) error
	// Resume lets the vCPUs run again and reports how long they were stopped.
	Resume() (FreezeReport, error)
}

// FreezeReport says how long the vCPUs were stopped, and how.
type FreezeReport struct {
	Window time.Duration
	Method string // "ptrace", "suspend", "gdbstub"
	VCPUs  int
}

// NewCodeWriter picks how code changes reach the guest. kind "" chooses
// from the accelerator: KVM executes guest RAM as is, so a direct write
// under a ptrace freeze is seen; TCG runs translations of it that only
// QEMU's own writes (the gdbstub) invalidate. "direct" means
// "direct+ptrace". mem is needed by the direct kinds.
func (d *Domain) NewCodeWriter(ctx context.Context, kind string, mem PhysMem) (CodeWriter, error) {
	if kind == "" {
		acc, err := d.Accel(ctx)
		if err != nil {
			return nil, err
		}
		kind = map[string]string{"kvm": "direct+ptrace", "tcg": "gdbstub"}[acc]
	}
	switch kind {
	case "direct", "direct+ptrace", "direct+suspend":
		if mem == nil {
			return nil, fmt.Errorf("domain %s: the %s writer needs guest memory (PhysMem)", d.Name(), kind)
		}
		freezer := "ptrace"
		if kind == "direct+suspend" {
			freezer = "suspend"
		}
		return &directWriter{d: d, mem: mem, freezer: freezer}, nil
	case "gdbstub":
		tids, err := d.VCPUThreads(ctx)
		if err != nil {
			return nil, err
		}
		return &gdbWriter{d: d, vcpus: len(tids)}, nil
	}
	return nil, fmt.Errorf("unknown code writer %q (want direct, direct+ptrace, direct+suspend, gdbstub or empty)", kind)
}

// directWriter writes guest RAM through PhysMem while a Freezer holds
// every vCPU.
type directWriter struct {
	d       *Domain
	mem     PhysMem
	freezer string
}

func (w *directWriter) Name() string { return "direct+" + w.freezer }

func (w *directWriter) Stop(ctx context.Context) (StoppedGuest, error) {
	// Thread ids are gathered again each time (before freezing: the
	// monitor must not be called while vCPU threads are stopped).
	tids, err := w.d.VCPUThreads(ctx)
	if err != nil {
		return nil, err
	}
	var f Freezer = w.d.SuspendFreezer()
	if w.freezer == "ptrace" {
		pid, err := w.d.QEMUPid(ctx)
		if err != nil {
			return nil, err
		}
		f = newPtraceFreezer(w.d.Name(), pid, tids)
	}
	fz, err := f.Freeze(ctx)
	if err != nil {
		return nil, err
	}
	return &directStopped{mem: w.mem, fz: fz, method: f.Name(), vcpus: len(tids)}, nil
}

type directStopped struct {
	mem    PhysMem
	fz     Frozen
	method string
	vcpus  int
	done   bool
}

func (s *directStopped) Read(va, gpa uint64, p []byte) error  { return s.mem.ReadPhys(gpa, p) }
func (s *directStopped) Write(va, gpa uint64, p []byte) error { return s.mem.WritePhys(gpa, p) }

func (s *directStopped) Resume() (FreezeReport, error) {
	if s.done {
		return FreezeReport{}, errors.New("already resumed")
	}
	s.done = true
	w, err := s.fz.Thaw()
	return FreezeReport{Window: w, Method: s.method, VCPUs: s.vcpus}, err
}
