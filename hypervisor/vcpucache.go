package hypervisor

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// vcpuCache keeps a domain's QEMU pid and vCPU thread ids between stops:
// asking the monitor (query-cpus-fast) costs a millisecond, more than a
// whole ptrace freeze. What is cached is checked on every use against
// /proc, which costs microseconds: the QEMU process must be the same one
// (pid and start time) and its threads must hold no vCPU thread the cache
// does not know (a vCPU hot-plugged since: QEMU names vCPU threads
// "CPU N/KVM" or "CPU N/TCG"), and every cached vCPU thread must still
// exist. Anything else asks the monitor again.
type vcpuCache struct {
	mu    sync.Mutex
	pid   int
	start string // /proc/PID/stat starttime
	tids  []int
	other map[int]bool // threads seen that are not vCPUs
}

func (c *vcpuCache) get(ctx context.Context, d *Domain) (int, []int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pid != 0 && c.valid() {
		return c.pid, c.tids, nil
	}
	pid, err := d.QEMUPid(ctx)
	if err != nil {
		return 0, nil, err
	}
	tids, err := d.VCPUThreads(ctx)
	if err != nil {
		return 0, nil, err
	}
	start, err := procStartTime(pid)
	if err != nil {
		return 0, nil, fmt.Errorf("domain %s: QEMU process %d: %w", d.Name(), pid, err)
	}
	c.pid, c.start, c.tids, c.other = pid, start, tids, map[int]bool{}
	return pid, tids, nil
}

func (c *vcpuCache) valid() bool {
	if st, err := procStartTime(c.pid); err != nil || st != c.start {
		return false
	}
	dir, err := os.Open("/proc/" + strconv.Itoa(c.pid) + "/task")
	if err != nil {
		return false
	}
	names, err := dir.Readdirnames(-1)
	dir.Close()
	if err != nil {
		return false
	}
	found := 0
	for _, n := range names {
		tid, err := strconv.Atoi(n)
		if err != nil || c.other[tid] {
			continue
		}
		if slices.Contains(c.tids, tid) {
			found++
			continue
		}
		comm, err := os.ReadFile("/proc/" + strconv.Itoa(c.pid) + "/task/" + n + "/comm")
		if err != nil {
			continue // gone already
		}
		if strings.HasPrefix(string(comm), "CPU ") {
			return false // a vCPU thread the cache does not know
		}
		if len(c.other) > 4096 {
			clear(c.other)
		}
		c.other[tid] = true
	}
	return found == len(slices.Compact(slices.Sorted(slices.Values(c.tids))))
}

// procStartTime is field 22 of /proc/PID/stat: when the process started,
// which tells a reused pid from the process that had it.
func procStartTime(pid int) (string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", err
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return "", fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	return f[19], nil
}
