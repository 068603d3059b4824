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

// DefaultLockDir holds the host-wide per-domain locks: every apply,
// revert and reconcile on a domain takes <dir>/<uuid>.lock, whatever its
// state directory, so the CLI (with any --state-dir) and hvpatchd never
// patch one domain at once. HVPATCH_LOCK_DIR overrides it (tests); so does
// StateDir.LockDir.
const DefaultLockDir = "/run/hvpatch/locks"

// HostLockDir is the directory of the host-wide locks for s.
func (s StateDir) HostLockDir() string {
	if s.LockDir != "" {
		return s.LockDir
	}
	if d := os.Getenv("HVPATCH_LOCK_DIR"); d != "" {
		return d
	}
	return DefaultLockDir
}

// DomainLock is held for the whole of one patch operation on a domain.
type DomainLock struct {
	uuid string
	host *os.File // the host-wide lock
	f    *os.File // the state directory's lock
}

// Lock takes the domain's lock without waiting: a per-process entry, an
// flock on the host-wide <HostLockDir>/<uuid>.lock (keyed by the domain's
// UUID, the same for every state directory), and an flock on
// <state>/<uuid>.lock. The flocks exclude other processes (the CLI and the
// daemon); the kernel drops them if the process dies.
func (s StateDir) Lock(name, uuid string) (*DomainLock, error) {
	if !uuidPattern.MatchString(uuid) {
		return nil, fmt.Errorf("domain UUID %q is not a UUID", uuid)
	}
	busy := fmt.Errorf("%w on domain %s", ErrBusy, name)
	if _, loaded := inProcess.LoadOrStore(uuid, struct{}{}); loaded {
		return nil, busy
	}
	dir := s.HostLockDir()
	host, err := flockFile(dir, 0o755, uuid, name, busy)
	if err != nil {
		inProcess.Delete(uuid)
		if !errors.Is(err, ErrBusy) {
			err = fmt.Errorf("host-wide lock of domain %s in %s: %w", name, dir, err)
		} else {
			err = fmt.Errorf("%w (host-wide lock %s)", err, filepath.Join(dir, uuid+".lock"))
		}
		return nil, err
	}
	f, err := flockFile(s.Dir, 0o700, uuid, name, busy)
	if err != nil {
		unlockFile(host)
		inProcess.Delete(uuid)
		return nil, err
	}
	return &DomainLock{uuid: uuid, host: host, f: f}, nil
}

// flockFile takes an exclusive flock on <dir>/<uuid>.lock without waiting.
func flockFile(dir string, mode os.FileMode, uuid, name string, busy error) (*os.File, error) {
	if err := os.MkdirAll(dir, mode); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, uuid+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, busy
		}
		return nil, fmt.Errorf("locking domain %s: %w", name, err)
	}
	return f, nil
}

func unlockFile(f *os.File) {
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	f.Close()
}

// Unlock releases the lock.
func (l *DomainLock) Unlock() {
	unlockFile(l.f)
	unlockFile(l.host)
	inProcess.Delete(l.uuid)
}
