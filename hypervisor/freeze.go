package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
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
//
// A ptrace freeze belongs to the goroutine that called Freeze (ptrace
// attachments belong to an OS thread, and that goroutine is locked to it
// until Thaw): Thaw must be called from the same goroutine. Every caller
// in this module stops, writes and resumes on one goroutine.
type Frozen interface {
	Thaw() (time.Duration, error)
}

// VCPUStops is what a ptrace freeze made with PtraceOptions.PerVCPU
// reports after Thaw: for each vCPU thread, how long the vCPU itself was
// stopped, from the moment it entered the stop to the moment it ran
// again, estimated from the kernel's scheduler accounting of the thread
// (/proc/PID/task/TID/schedstat). It waits (up to a second) until every
// vCPU thread has run again; a thread that did not gets -1.
type VCPUStops interface {
	VCPUStops() []time.Duration
}

// PtraceOptions tune a ptrace freezer.
type PtraceOptions struct {
	// NoBoost leaves the freezing thread at its normal scheduling policy.
	// By default it runs SCHED_FIFO (priority 1) from the first stop
	// request to the last resume, so that on a busy host its wake-ups
	// (each poll for the vCPU threads' stops, the writes, the detach) do
	// not queue behind other tasks. The vCPU threads themselves are not
	// touched. Without CAP_SYS_NICE the boost is skipped silently.
	NoBoost bool
	// PerVCPU measures each vCPU's own stop (VCPUStops). It costs a few
	// microseconds per vCPU inside the window: benchmarks only.
	PerVCPU bool
}

// PtraceFreezer freezes by ptrace-interrupting every vCPU thread of QEMU.
// The threads are found now, through the monitor; Freeze itself never
// calls the monitor (it can wait on stopped vCPU threads). If this process
// dies during a freeze, the kernel detaches and the vCPUs run on.
func (d *Domain) PtraceFreezer(ctx context.Context) (Freezer, error) {
	return d.PtraceFreezerWith(ctx, PtraceOptions{})
}

// PtraceFreezerWith is PtraceFreezer with options.
func (d *Domain) PtraceFreezerWith(ctx context.Context, o PtraceOptions) (Freezer, error) {
	pid, err := d.QEMUPid(ctx)
	if err != nil {
		return nil, err
	}
	tids, err := d.VCPUThreads(ctx)
	if err != nil {
		return nil, err
	}
	f := newPtraceFreezer(d.Name(), pid, tids)
	f.opts = o
	return f, nil
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
	opts   PtraceOptions
	// StopTimeout bounds the wait for the threads to stop when ctx has no
	// deadline.
	stopTimeout time.Duration
}

func (f *ptraceFreezer) Name() string { return "ptrace" }

// ptraceFrozen is one freeze, held by the OS thread tracer.
type ptraceFrozen struct {
	f      *ptraceFreezer
	tracer int // thread id of the tracer: Thaw must run on it
	start  time.Time
	sigs   []int
	boost  *schedState // policy to restore at thaw; nil when not boosted
	thawed bool

	// PerVCPU measurement.
	stat    []*os.File
	intAt   []time.Time // when each thread was asked to stop
	stopAt  []time.Time // estimated moment each thread entered its stop
	before  []schedStat // at the stop request
	stopped []schedStat // in the stop
	detAt   []time.Time // when each thread was let go
	stops   []time.Duration
}

// Freeze stops every vCPU thread. It runs on the calling goroutine, locked
// to its OS thread until Thaw: no goroutine hand-off on the way (each one
// is a wake-up that, on a busy host, waits for a CPU), and the thread
// stays alive between freezes. The sequence: PTRACE_SEIZE every thread
// (the guest keeps running: nothing is stopped yet), then PTRACE_INTERRUPT
// every thread back to back, then collect the stops with non-blocking
// waits and short naps. The window starts at the first interrupt.
func (f *ptraceFreezer) Freeze(ctx context.Context) (Frozen, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		t := f.stopTimeout
		if t == 0 {
			t = 2 * time.Second
		}
		deadline = time.Now().Add(t)
	}
	runtime.LockOSThread()
	fz := &ptraceFrozen{f: f, tracer: unix.Gettid(), sigs: make([]int, len(f.tids))}
	if f.opts.PerVCPU {
		fz.openStats()
	}
	seized := 0
	fail := func(err error) (Frozen, error) {
		fz.abort(seized, deadline)
		return nil, fmt.Errorf("domain %s: ptrace freeze of QEMU %d: %w", f.domain, f.pid, err)
	}
	for _, tid := range f.tids {
		if err := ptrace(unix.PTRACE_SEIZE, tid, 0); err != nil {
			return fail(fmt.Errorf("PTRACE_SEIZE vCPU thread %d: %v", tid, err))
		}
		seized++
	}
	if f.opts.PerVCPU {
		fz.sample(fz.before)
	}
	fz.start = time.Now()
	for i, tid := range f.tids {
		if err := ptrace(unix.PTRACE_INTERRUPT, tid, 0); err != nil {
			return fail(fmt.Errorf("PTRACE_INTERRUPT vCPU thread %d: %v", tid, err))
		}
		if fz.intAt != nil {
			fz.intAt[i] = time.Now()
		}
	}
	if err := fz.collect(deadline, nil); err != nil {
		return fail(err)
	}
	if !f.opts.NoBoost {
		fz.boost = boostThread()
	}
	if f.opts.PerVCPU {
		fz.sample(fz.stopped)
		for i := range f.tids {
			run := time.Duration(fz.stopped[i].exec-fz.before[i].exec) + time.Duration(fz.stopped[i].delay-fz.before[i].delay)
			fz.stopAt[i] = fz.intAt[i].Add(run)
		}
	}
	return fz, nil
}

// collect waits until every tracee is in a ptrace stop, recording its
// stop signal. done (optional) marks threads already collected.
//
// It polls rather than blocks in waitid so that a thread that never stops
// (stuck in an uninterruptible sleep) cannot hold the others past the
// deadline: no signal can cut a blocking wait short in a Go program (the
// runtime's handlers restart system calls). The naps start at 2 µs and
// double up to 16 µs; with the boost their wake-ups are punctual on a
// busy host, and between them the CPU is free for the tracees, which
// need it to reach their stop.
func (fz *ptraceFrozen) collect(deadline time.Time, done []bool) error {
	tids := fz.f.tids
	if done == nil {
		done = make([]bool, len(tids))
	}
	left := 0
	for _, d := range done {
		if !d {
			left++
		}
	}
	nap := 2 * time.Microsecond
	for {
		for i, tid := range tids {
			if done[i] {
				continue
			}
			var ws unix.WaitStatus
			wpid, err := unix.Wait4(tid, &ws, unix.WALL|unix.WNOHANG, nil)
			switch {
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				return fmt.Errorf("vCPU thread %d: wait4: %v", tid, err)
			case wpid == tid && (ws.Exited() || ws.Signaled()):
				done[i] = true // gone: nothing to detach
				return fmt.Errorf("vCPU thread %d exited", tid)
			case wpid == tid && ws.Stopped():
				if int(ws)>>16 == 0 { // not PTRACE_EVENT_STOP
					fz.sigs[i] = int(ws.StopSignal()) // signal-delivery stop: re-inject on detach
				}
				done[i] = true
				left--
			}
		}
		if left == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			var late []string
			for i, tid := range tids {
				if !done[i] {
					late = append(late, strconv.Itoa(tid))
				}
			}
			return fmt.Errorf("vCPU threads %s did not stop in time", strings.Join(late, ", "))
		}
		ts := unix.NsecToTimespec(int64(nap))
		unix.Nanosleep(&ts, nil)
		nap = min(2*nap, 16*time.Microsecond)
	}
}

// abort undoes a failed freeze: the first seized threads are interrupted
// (if they were not), collected and detached. When that cannot complete
// in time (a thread stuck in the kernel), the goroutine stays locked to
// this OS thread, so the tracees stay attached to it and are detached by
// the kernel when the goroutine ends and its thread exits; the caller
// sees the error either way.
func (fz *ptraceFrozen) abort(seized int, deadline time.Time) {
	tids := fz.f.tids[:seized]
	done := make([]bool, len(fz.f.tids))
	for i := seized; i < len(done); i++ {
		done[i] = true
	}
	for _, tid := range tids {
		ptrace(unix.PTRACE_INTERRUPT, tid, 0) // EIO/ESRCH when already stopped or gone
	}
	clean := true
	if err := fz.collect(later(deadline, time.Now().Add(time.Second)), done); err != nil {
		clean = false
	}
	for i, tid := range tids {
		if done[i] {
			if err := ptrace(unix.PTRACE_DETACH, tid, uintptr(fz.sigs[i])); err != nil && !errors.Is(err, unix.ESRCH) {
				clean = false
			}
		}
	}
	fz.closeStats()
	if fz.boost != nil && !fz.boost.restore() {
		clean = false
	}
	if clean {
		runtime.UnlockOSThread()
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (fz *ptraceFrozen) Thaw() (time.Duration, error) {
	if fz.thawed {
		return 0, errors.New("already thawed")
	}
	if tid := unix.Gettid(); tid != fz.tracer {
		return 0, fmt.Errorf("domain %s: thaw from thread %d: the freeze is held by thread %d; call Thaw on the goroutine that called Freeze", fz.f.domain, tid, fz.tracer)
	}
	fz.thawed = true
	if fz.stat != nil {
		fz.detAt = make([]time.Time, len(fz.f.tids))
	}
	var errs []error
	for i, tid := range fz.f.tids {
		if err := ptrace(unix.PTRACE_DETACH, tid, uintptr(fz.sigs[i])); err != nil {
			errs = append(errs, fmt.Errorf("PTRACE_DETACH vCPU thread %d: %w", tid, err))
		}
		if fz.detAt != nil {
			fz.detAt[i] = time.Now()
		}
	}
	w := time.Since(fz.start)
	restored := fz.boost == nil || fz.boost.restore()
	if len(errs) == 0 && restored {
		runtime.UnlockOSThread()
	} // else: the thread ends with the goroutine, which detaches the rest
	if !restored {
		errs = append(errs, errors.New("could not restore the freezing thread's scheduling policy"))
	}
	if err := errors.Join(errs...); err != nil {
		return w, fmt.Errorf("domain %s: thaw: %w", fz.f.domain, err)
	}
	return w, nil
}

// VCPUStops: see the VCPUStops interface.
func (fz *ptraceFrozen) VCPUStops() []time.Duration {
	if fz.stat == nil || fz.detAt == nil {
		return nil
	}
	if fz.stops != nil {
		return fz.stops
	}
	defer fz.closeStats()
	fz.stops = make([]time.Duration, len(fz.f.tids))
	for i := range fz.stops {
		fz.stops[i] = -1
	}
	deadline := time.Now().Add(time.Second)
	left := len(fz.stops)
	for left > 0 && time.Now().Before(deadline) {
		for i := range fz.stops {
			if fz.stops[i] >= 0 {
				continue
			}
			s, err := readSchedStat(fz.stat[i])
			if err != nil {
				fz.stops[i] = -1
				left--
				continue
			}
			if s.slices == fz.stopped[i].slices {
				continue // not run yet
			}
			// It ran again after waiting delay on a run queue since
			// the detach (an upper bound if it was queued again since).
			ranAt := fz.detAt[i].Add(time.Duration(s.delay - fz.stopped[i].delay))
			fz.stops[i] = max(ranAt.Sub(fz.stopAt[i]), 0)
			left--
		}
		time.Sleep(50 * time.Microsecond)
	}
	return fz.stops
}

func (fz *ptraceFrozen) openStats() {
	n := len(fz.f.tids)
	for _, tid := range fz.f.tids {
		f, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/schedstat", fz.f.pid, tid))
		if err != nil {
			fz.closeStats()
			return
		}
		fz.stat = append(fz.stat, f)
	}
	fz.intAt, fz.stopAt = make([]time.Time, n), make([]time.Time, n)
	fz.before, fz.stopped = make([]schedStat, n), make([]schedStat, n)
}

func (fz *ptraceFrozen) closeStats() {
	for _, f := range fz.stat {
		f.Close()
	}
	fz.stat = nil
}

func (fz *ptraceFrozen) sample(into []schedStat) {
	for i, f := range fz.stat {
		into[i], _ = readSchedStat(f)
	}
}

// schedStat is /proc/PID/task/TID/schedstat: time on CPU, time waiting on
// a run queue (both ns), and the number of times the thread got a CPU.
type schedStat struct{ exec, delay, slices uint64 }

func readSchedStat(f *os.File) (schedStat, error) {
	var b [96]byte
	n, err := f.ReadAt(b[:], 0)
	if n == 0 {
		return schedStat{}, err
	}
	fields := strings.Fields(string(b[:n]))
	if len(fields) < 3 {
		return schedStat{}, fmt.Errorf("schedstat %q", b[:n])
	}
	var s schedStat
	s.exec, _ = strconv.ParseUint(fields[0], 10, 64)
	s.delay, _ = strconv.ParseUint(fields[1], 10, 64)
	s.slices, _ = strconv.ParseUint(fields[2], 10, 64)
	return s, nil
}

// schedState is a thread's scheduling attributes, to restore after a boost.
type schedState struct{ attr *unix.SchedAttr }

// boostThread makes the calling thread SCHED_FIFO priority 1 and returns
// what to restore, or nil when it could not (no CAP_SYS_NICE).
func boostThread() *schedState {
	old, err := unix.SchedGetAttr(0, 0)
	if err != nil {
		return nil
	}
	fifo := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 1}
	if unix.SchedSetAttr(0, &fifo, 0) != nil {
		return nil
	}
	return &schedState{old}
}

func (s *schedState) restore() bool {
	return unix.SchedSetAttr(0, s.attr, 0) == nil
}

func ptrace(req int, tid int, data uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(tid), 0, data, 0, 0)
	if e != 0 {
		return e
	}
	return nil
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
