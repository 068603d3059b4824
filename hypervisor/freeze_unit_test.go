package hypervisor

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// threadsHelper stands in for QEMU: it starts n threads ("busy" ones spin,
// the others sleep in short naps, like halted vCPUs), prints their thread
// ids on one line and waits to be killed.
func threadsHelper(spec string) int {
	n, _ := strconv.Atoi(strings.TrimSuffix(spec, "busy"))
	busy := strings.HasSuffix(spec, "busy")
	tids := make(chan int)
	for i := 0; i < n; i++ {
		go func() {
			runtime.LockOSThread()
			tids <- unix.Gettid()
			x := 0
			for {
				if busy {
					x++
					continue
				}
				time.Sleep(time.Millisecond)
			}
		}()
	}
	var list []string
	for i := 0; i < n; i++ {
		list = append(list, strconv.Itoa(<-tids))
	}
	fmt.Println(strings.Join(list, ","))
	select {}
}

// startThreads runs the helper and returns its pid and thread ids.
func startThreads(t *testing.T, spec string) (int, []int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "HVPATCH_THREADS_HELPER="+spec)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("threads helper: %v", err)
	}
	var tids []int
	for _, s := range strings.Split(strings.TrimSpace(line), ",") {
		tid, _ := strconv.Atoi(s)
		tids = append(tids, tid)
	}
	return cmd.Process.Pid, tids
}

func canPtrace(t *testing.T) {
	if os.Geteuid() != 0 {
		if b, err := os.ReadFile("/proc/sys/kernel/yama/ptrace_scope"); err == nil && strings.TrimSpace(string(b)) != "0" {
			t.Skip("ptrace of a child's threads needs root or ptrace_scope 0")
		}
	}
}

// TestPtraceFreezeThreads freezes and thaws the threads of a stand-in
// process on the caller's goroutine: every thread is traced while frozen,
// none after, the freezing goroutine's thread is released, and a thaw
// from another goroutine is refused without losing the freeze.
func TestPtraceFreezeThreads(t *testing.T) {
	canPtrace(t)
	for _, spec := range []string{"2", "3busy"} {
		t.Run(spec, func(t *testing.T) {
			pid, tids := startThreads(t, spec)
			f := newPtraceFreezer("helper", pid, tids)
			f.opts.PerVCPU = true
			var windows []time.Duration
			for i := 0; i < 20; i++ {
				fz, err := f.Freeze(t0ctx())
				if err != nil {
					t.Fatal(err)
				}
				states := threadStates(t, pid, tids)
				if i == 0 {
					errc := make(chan error)
					go func() { _, err := fz.Thaw(); errc <- err }()
					if err := <-errc; err == nil || !strings.Contains(err.Error(), "goroutine that called Freeze") {
						t.Errorf("thaw from another goroutine: %v", err)
					}
				}
				w, err := fz.Thaw()
				if err != nil {
					t.Fatal(err)
				}
				if !allTraced(states) {
					t.Fatalf("frozen threads in states %q", states)
				}
				stops := fz.(VCPUStops).VCPUStops()
				if len(stops) != len(tids) {
					t.Fatalf("per-vCPU stops %v for %d threads", stops, len(tids))
				}
				windows = append(windows, w)
			}
			if s := waitUntraced(t, pid, tids); strings.Contains(s, "t") {
				t.Errorf("after thaw: states %q", s)
			}
			slices.Sort(windows)
			t.Logf("%s: window min %v median %v max %v", spec, windows[0], windows[len(windows)/2], windows[len(windows)-1])
		})
	}
}

// TestPtraceFreezeGoneThread: a thread id that does not exist fails the
// freeze, and the threads seized before it run again.
func TestPtraceFreezeGoneThread(t *testing.T) {
	canPtrace(t)
	pid, tids := startThreads(t, "2")
	f := newPtraceFreezer("helper", pid, append(slices.Clone(tids), 1<<22-1))
	if _, err := f.Freeze(t0ctx()); err == nil {
		t.Fatal("freeze with a missing thread succeeded")
	}
	if s := waitUntraced(t, pid, tids); strings.Contains(s, "t") {
		t.Errorf("after the failed freeze: states %q", s)
	}
	// The thread is free for another freeze.
	f = newPtraceFreezer("helper", pid, tids)
	fz, err := f.Freeze(t0ctx())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fz.Thaw(); err != nil {
		t.Fatal(err)
	}
}

// TestVCPUCacheValid: the cached thread ids hold while the process and its
// threads are the same, and not once a cached thread is gone.
func TestVCPUCacheValid(t *testing.T) {
	pid, tids := startThreads(t, "2")
	st, err := procStartTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	c := &vcpuCache{pid: pid, start: st, tids: tids, other: map[int]bool{}}
	for range 2 { // the second pass goes through the cached other threads
		if !c.valid() {
			t.Fatal("cache of live threads is not valid")
		}
	}
	c.tids = append(slices.Clone(tids), 1<<22-1)
	if c.valid() {
		t.Fatal("cache with a missing thread is valid")
	}
	c.tids, c.start = tids, st+"0"
	if c.valid() {
		t.Fatal("cache of another process start is valid")
	}
}
