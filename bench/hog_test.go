package bench

import (
	"os/exec"
	"runtime"
	"testing"
	"time"
)

// hogs keeps every host core busy with a CPU-bound process (a shell loop
// at normal priority) until stop is called: a hosting provider's busy host.
type hogs struct{ cmds []*exec.Cmd }

func startHogs(t *testing.T) *hogs {
	h := &hogs{}
	for i := 0; i < runtime.NumCPU(); i++ {
		c := exec.Command("sh", "-c", "while :; do :; done")
		if err := c.Start(); err != nil {
			h.stop()
			t.Fatalf("starting a CPU hog: %v", err)
		}
		h.cmds = append(h.cmds, c)
	}
	t.Cleanup(h.stop)
	time.Sleep(200 * time.Millisecond) // let them reach the run queues
	return h
}

// stop kills the hogs this benchmark started (by pid) and reaps them.
func (h *hogs) stop() {
	for _, c := range h.cmds {
		c.Process.Kill()
		c.Wait()
	}
	h.cmds = nil
}
