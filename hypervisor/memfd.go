package hypervisor

import (
	"context"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// memfdMem maps QEMU's guest-RAM file (a memfd, or any shared file mapping)
// into this process: reads and writes are plain memory copies.
type memfdMem struct {
	domain  string
	regions []Region
	slices  [][]byte // per region, into data

	mu   sync.RWMutex // Close waits for copies in flight
	data []byte       // the whole mapping; nil after Close
}

func (d *Domain) openMemfd(ctx context.Context) (PhysMem, error) {
	pid, live, err := d.liveLayout(ctx)
	if err != nil {
		return nil, err
	}
	fail := func(format string, a ...any) error {
		return fmt.Errorf("domain %s: memfd backend: %s", d.Name(), fmt.Sprintf(format, a...))
	}
	maps, err := procMaps(pid)
	if err != nil {
		return nil, fail("%v", err)
	}
	blockHVA := live[0].HVA - live[0].Offset
	var m *mapping
	for i := range maps {
		if maps[i].Start <= blockHVA && blockHVA < maps[i].End {
			m = &maps[i]
		}
	}
	if m == nil || m.Inode == 0 || !strings.HasPrefix(m.Path, "/") {
		return nil, fail("guest RAM at host address %#x is not a file mapping (memfd or shared file backing needed)", blockHVA)
	}
	for _, r := range live {
		if r.HVA < m.Start || r.HVA+r.Size > m.End {
			return nil, fail("RAM piece %s (%#x, host %#x) is outside the mapping %#x-%#x", r.Name, r.GPA, r.HVA, m.Start, m.End)
		}
	}
	fdNum, err := findFD(pid, m)
	if err != nil {
		return nil, fail("%v", err)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fail("pidfd_open(%d): %v", pid, err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, fdNum, 0)
	if err != nil {
		return nil, fail("pidfd_getfd(QEMU %d, fd %d): %v", pid, fdNum, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fail("fstat: %v", err)
	}
	if st.Ino != m.Inode {
		return nil, fail("fd %d of QEMU %d changed under us", fdNum, pid)
	}
	data, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fail("mmap of %d bytes: %v", st.Size, err)
	}
	mm := &memfdMem{domain: d.Name(), data: data, regions: regionsOf(live)}
	for _, r := range live {
		off := m.Offset + (r.HVA - m.Start)
		if off+r.Size > uint64(len(data)) {
			unix.Munmap(data)
			return nil, fail("RAM piece %s ends past the file (%d bytes)", r.Name, len(data))
		}
		mm.slices = append(mm.slices, data[off:off+r.Size:off+r.Size])
	}
	return mm, nil
}

// findFD finds the QEMU file descriptor behind mapping m.
func findFD(pid int, m *mapping) (int, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		var n int
		if _, err := fmt.Sscanf(e.Name(), "%d", &n); err != nil {
			continue
		}
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || target != m.Path {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(dir+"/"+e.Name(), &st) == nil && st.Ino == m.Inode {
			return n, nil
		}
	}
	return 0, fmt.Errorf("no open fd of QEMU %d refers to %s (inode %d)", pid, m.Path, m.Inode)
}

func (m *memfdMem) Regions() []Region { return m.regions }

func (m *memfdMem) ReadPhys(gpa uint64, p []byte) error {
	return m.access("read", gpa, p, false)
}

func (m *memfdMem) WritePhys(gpa uint64, p []byte) error {
	return m.access("write", gpa, p, true)
}

func (m *memfdMem) access(op string, gpa uint64, p []byte, write bool) error {
	spans, err := splitAccess(m.regions, op, gpa, len(p))
	if err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.data == nil {
		return &AccessError{Op: op, GPA: gpa, Len: len(p), What: "guest memory of " + m.domain + " is closed"}
	}
	for _, s := range spans {
		mem := m.slices[s.idx][s.off : s.off+uint64(s.hi-s.lo)]
		var err error
		if write {
			err = safeCopy(mem, p[s.lo:s.hi])
		} else {
			err = safeCopy(p[s.lo:s.hi], mem)
		}
		if err != nil {
			return &AccessError{Op: op, GPA: gpa, Len: len(p), What: err.Error()}
		}
	}
	return nil
}

// safeCopy copies between a mapping and memory, turning a fault (SIGBUS
// when the file shrank, SIGSEGV when the mapping vanished) into an error.
func safeCopy(dst, src []byte) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if fe, ok := r.(interface{ Addr() uintptr }); ok {
				err = fmt.Errorf("memory fault at host address %#x: the guest RAM mapping is gone", fe.Addr())
				return
			}
			panic(r)
		}
	}()
	copy(dst, src)
	return nil
}

func (m *memfdMem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.data == nil {
		return nil
	}
	err := unix.Munmap(m.data)
	m.data, m.slices = nil, nil
	return err
}
