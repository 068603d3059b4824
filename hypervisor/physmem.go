// Package hypervisor is the only part of hvpatch that talks to libvirt, the
// QEMU monitor and the QEMU process. Everything above it sees guest memory
// through PhysMem, vCPU state through CPUState, and changes code through a
// Freezer and a Writer.
package hypervisor

import (
	"errors"
	"fmt"
)

// PhysMem reads and writes guest-physical memory. Implementations: memfd
// (QEMU's RAM file mapped into this process), process_vm_readv/writev on the
// QEMU process, and read-only offline images (ELF core dumps, raw files).
//
// A range may span several RAM regions; a range touching anything that is not
// RAM (a hole, MMIO) fails as a whole with an *AccessError and, for writes,
// changes nothing.
type PhysMem interface {
	ReadPhys(gpa uint64, p []byte) error
	WritePhys(gpa uint64, p []byte) error
	// Regions lists guest RAM, sorted by address, non-overlapping.
	Regions() []Region
	Close() error
}

// Region is one contiguous range of guest RAM.
type Region struct {
	GPA  uint64 // first guest-physical address
	Size uint64
	Name string // e.g. "pc.ram", "pc.ram@4G"
}

// End is the first address past the region.
func (r Region) End() uint64 { return r.GPA + r.Size }

// ErrReadOnly is returned by writes to offline images.
var ErrReadOnly = errors.New("guest memory image is read-only")

// AccessError reports a guest-physical access outside RAM.
type AccessError struct {
	Op   string // "read" or "write"
	GPA  uint64
	Len  int
	What string // why, e.g. "not RAM (hole or MMIO)"
}

func (e *AccessError) Error() string {
	return fmt.Sprintf("guest-physical %s of %d bytes at %#x: %s", e.Op, e.Len, e.GPA, e.What)
}
