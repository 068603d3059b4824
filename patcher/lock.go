package patcher

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrBusy is returned when another patch operation holds the domain.
var ErrBusy = errors.New("another patch operation is in progress")

// inProcess refuses a second operation from the same process before it
// touches the filesystem; the flock below covers other processes.
var inProcess sync.Map // uuid -> struct{}

// DomainLock is held for the whole of one patch operation on a domain.
type DomainLock struct {
	uuid string
	f    *os.File
}

// Lock takes the domain's lock without waiting: a per-process entry plus an
// flock on <state>/<uuid>.lock, which also excludes other processes (the CLI
// and the daemon). The kernel drops the flock if the process dies.
func (s StateDir) Lock(name, uuid string) (*DomainLock, error) {
	if !uuidPattern.MatchString(uuid) {
		return nil, fmt.Errorf("domain UUID %q is not a UUID", uuid)
	}
	busy := fmt.Errorf("%w on domain %s", ErrBusy, name)
	if _, loaded := inProcess.LoadOrStore(uuid, struct{}{}); loaded {
		return nil, busy
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		inProcess.Delete(uuid)
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(s.Dir, uuid+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		inProcess.Delete(uuid)
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		inProcess.Delete(uuid)
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, busy
		}
		return nil, fmt.Errorf("locking domain %s: %w", name, err)
	}
	return &DomainLock{uuid: uuid, f: f}, nil
}

// Unlock releases the lock.
func (l *DomainLock) Unlock() {
	unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	l.f.Close()
	inProcess.Delete(l.uuid)
}
