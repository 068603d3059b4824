package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Freezer stops every vCPU of a domain until Thaw.
type Freezer interface {
	Freeze(ctx context.Context) (Frozen, error)
	Name() string // "ptrace" or "suspend"
}

// Frozen is a domain whose vCPUs are stopped. Thaw lets them run and
// reports how long they were stopped (host-side, from the first stop
// request to the last resume).
type Frozen interface {
	Thaw() (time.Duration, error)
}

// PtraceFreezer freezes by ptrace-interrupting every vCPU thread of QEMU.
// The threads are found now, through the monitor; Freeze itself never
// calls the monitor (it can wait on stopped vCPU threads). If this process
// dies during a freeze, the kernel detaches and the vCPUs run on.
func (d *Domain) PtraceFreezer(ctx context.Context) (Freezer, error) {
	pid, err := d.QEMUPid(ctx)
	if err != nil {
		return nil, err
	}
	tids, err := d.VCPUThreads(ctx)
	if err != nil {
		return nil, err
	}
	return newPtraceFreezer(d.Name(), pid, tids), nil
}

func newPtraceFreezer(domain string, pid int, tids []int) *ptraceFreezer {
	tids = slices.Clone(tids)
	slices.Sort(tids)
	return &ptraceFreezer{domain: domain, pid: pid, tids: slices.Compact(tids)}
}

type ptraceFreezer struct {
	domain string
	pid    int
	tids   []int
	// StopTimeout bounds the wait for the threads to stop when ctx has no
	// deadline.
	stopTimeout time.Duration
}

func (f *ptraceFreezer) Name() string { return "ptrace" }

type ptraceFrozen struct {
	thaw chan struct{}
	done chan thawResult
}

type thawResult struct {
	window time.Duration
	err    error
}

func (f *ptraceFreezer) Freeze(ctx context.Context) (Frozen, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		t := f.stopTimeout
		if t == 0 {
			t = 2 * time.Second
		}
		deadline = time.Now().Add(t)
	}
	fz := &ptraceFrozen{thaw: make(chan struct{}), done: make(chan thawResult, 1)}
	ready := make(chan error, 1)
	go f.hold(deadline, ready, fz)
	if err := <-ready; err != nil {
		return nil, err
	}
	return fz, nil
}

// hold runs on its own OS thread for the whole freeze: ptrace attachments
// belong to a thread. It never unlocks it, so on any early return the
// thread exits and the kernel detaches whatever it had seized.
func (f *ptraceFreezer) hold(deadline time.Time, ready chan<- error, fz *ptraceFrozen) {
	runtime.LockOSThread()
	unix.Prctl(unix.PR_SET_TIMERSLACK, 1000, 0, 0, 0) // precise naps in waitStopped (this thread only)
	fail := func(format string, a ...any) {
		ready <- fmt.Errorf("domain %s: ptrace freeze of QEMU %d: %s", f.domain, f.pid, fmt.Sprintf(format, a...))
	}
	start := time.Now()
	for _, tid := range f.tids {
		if err := ptrace(unix.PTRACE_SEIZE, tid, 0); err != nil {
			fail("PTRACE_SEIZE vCPU thread %d: %v", tid, err)
			return
		}
		if err := ptrace(unix.PTRACE_INTERRUPT, tid, 0); err != nil {
			fail("PTRACE_INTERRUPT vCPU thread %d: %v", tid, err)
			return
		}
	}
	// A thread may report a signal-delivery stop instead of the interrupt
	// stop; it is stopped all the same, and the signal goes back on detach.
	sigs := make([]int, len(f.tids))
	for i, tid := range f.tids {
		sig, err := waitStopped(tid, deadline)
		if err != nil {
			fail("vCPU thread %d: %v", tid, err)
			return
		}
		sigs[i] = sig
	}
	ready <- nil
	<-fz.thaw
	var errs []error
	for i, tid := range f.tids {
		if err := ptrace(unix.PTRACE_DETACH, tid, uintptr(sigs[i])); err != nil {
			errs = append(errs, fmt.Errorf("PTRACE_DETACH vCPU thread %d: %w", tid, err))
		}
	}
	w := time.Since(start)
	err := errors.Join(errs...)
	if err != nil {
		err = fmt.Errorf("domain %s: thaw: %w", f.domain, err) // the thread's exit detaches the rest
	}
	fz.done <- thawResult{w, err}
}

// waitStopped waits until tracee tid is in a ptrace stop. It polls rather
// than blocks in wait4 so that a thread that never stops (stuck in an
// uninterruptible sleep) cannot hold the other vCPUs past the deadline.
func waitStopped(tid int, deadline time.Time) (int, error) {
	for {
		var ws unix.WaitStatus
		wpid, err := unix.Wait4(tid, &ws, unix.WALL|unix.WNOHANG, nil)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return 0, fmt.Errorf("wait4: %v", err)
		case wpid == tid && (ws.Exited() || ws.Signaled()):
			return 0, fmt.Errorf("thread exited")
		case wpid == tid && ws.Stopped():
			if int(ws)>>16 == 0 { // not PTRACE_EVENT_STOP
				return int(ws.StopSignal()), nil // signal-delivery stop: re-inject on detach
			}
			return 0, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("did not stop in time")
		}
		// Short naps with a 1 µs timer slack: measured on a loaded 2-core
		// host, they beat spinning and sched_yield (the tracee may need
		// our core to reach its stop) in median and tail alike.
		nap := unix.Timespec{Nsec: 10_000}
		unix.Nanosleep(&nap, nil)
	}
}

func ptrace(req int, tid int, data uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(tid), 0, data, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func (fz *ptraceFrozen) Thaw() (time.Duration, error) {
	select {
	case <-fz.thaw:
		return 0, errors.New("already thawed")
	default:
	}
	close(fz.thaw)
	r := <-fz.done
	return r.window, r.err
}

// SuspendFreezer freezes through libvirt (suspend/resume): works anywhere,
// costs milliseconds.
func (d *Domain) SuspendFreezer() Freezer { return suspendFreezer{d} }

type suspendFreezer struct{ d *Domain }

func (s suspendFreezer) Name() string { return "suspend" }

func (s suspendFreezer) Freeze(ctx context.Context) (Frozen, error) {
	start := time.Now()
	if err := s.d.Suspend(ctx); err != nil {
		return nil, err
	}
	return &suspendFrozen{d: s.d, start: start}, nil
}

type suspendFrozen struct {
	d      *Domain
	start  time.Time
	thawed bool
}

func (s *suspendFrozen) Thaw() (time.Duration, error) {
	if s.thawed {
		return 0, errors.New("already thawed")
	}
	s.thawed = true
	err := s.d.Resume(context.Background())
	return time.Since(s.start), err
}
