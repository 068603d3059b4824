package hypervisor

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"
)

// processMem reads and writes guest RAM in QEMU's address space with
// process_vm_readv/writev: it works whatever backs the RAM.
type processMem struct {
	domain  string
	pid     int
	regions []Region
	hva     []uint64 // per region
}

func (d *Domain) openProcess(ctx context.Context) (PhysMem, error) {
	pid, live, err := d.liveLayout(ctx)
	if err != nil {
		return nil, err
	}
	pm := &processMem{domain: d.Name(), pid: pid, regions: regionsOf(live)}
	for _, r := range live {
		pm.hva = append(pm.hva, r.HVA)
	}
	// Prove access now rather than at the first real read.
	var probe [8]byte
	if err := pm.ReadPhys(live[0].GPA, probe[:]); err != nil {
		return nil, fmt.Errorf("domain %s: process backend: %w", d.Name(), err)
	}
	return pm, nil
}

func (m *processMem) Regions() []Region { return m.regions }
func (m *processMem) Close() error      { return nil }

func (m *processMem) ReadPhys(gpa uint64, p []byte) error {
	return m.access("read", gpa, p)
}

func (m *processMem) WritePhys(gpa uint64, p []byte) error {
	return m.access("write", gpa, p)
}

func (m *processMem) access(op string, gpa uint64, p []byte) error {
	spans, err := splitAccess(m.regions, op, gpa, len(p))
	if err != nil {
		return err
	}
	for _, s := range spans {
		local := []unix.Iovec{{Base: &p[s.lo]}}
		local[0].SetLen(s.hi - s.lo)
		remote := []unix.RemoteIovec{{Base: uintptr(m.hva[s.idx] + s.off), Len: s.hi - s.lo}}
		var n int
		if op == "write" {
			n, err = unix.ProcessVMWritev(m.pid, local, remote, 0)
		} else {
			n, err = unix.ProcessVMReadv(m.pid, local, remote, 0)
		}
		if err == nil && n != s.hi-s.lo {
			err = fmt.Errorf("short transfer (%d of %d bytes)", n, s.hi-s.lo)
		}
		if err != nil {
			return &AccessError{Op: op, GPA: gpa, Len: len(p),
				What: fmt.Sprintf("process_vm_%sv on QEMU %d of %s at host %#x: %v", op, m.pid, m.domain, m.hva[s.idx]+s.off, err)}
		}
	}
	return nil
}
