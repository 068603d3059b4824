package testguest

import (
	"bytes"
	"fmt"
	"os"
	"time"
)

// Reboot reboots the guest from inside (reboot -f: the test init is a
// shell, which ignores the signal a plain reboot sends it). The domain
// restarts in the same QEMU process (on_reboot=restart); Reboot waits for
// the new kernel's ready line on the console, re-syncs the serial shell and
// returns when that ready line was seen.
func (g *Guest) Reboot(timeout time.Duration) (time.Time, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shellBroken != nil {
		return time.Time{}, fmt.Errorf("guest shell unusable: %w", g.shellBroken)
	}
	before := len(readyLine.FindAllIndex([]byte(g.Console()), -1))
	g.shell.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(g.shell, "reboot -f\n%s", uartFlush); err != nil {
		g.shellBroken = err
		return time.Time{}, err
	}
	deadline := time.Now().Add(timeout)
	var ready time.Time
	last := time.Now()
	for {
		b, _ := os.ReadFile(g.ConsolePath())
		if m := readyLine.FindAllSubmatch(b, -1); len(m) > before {
			ready = time.Now()
			g.Release = string(m[len(m)-1][1])
			break
		}
		if err := g.consoleTrouble(); err != nil {
			return time.Time{}, err
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("guest %s: no new ready line within %v of reboot\nconsole tail:\n%s", g.Name, timeout, tail(g.Console(), 20))
		}
		// Input can wait in the UART below its FIFO trigger level (see
		// uartFlush): push it until the kernel says it restarts.
		if !bytes.Contains(b[len(b)-min(len(b), 4096):], []byte("reboot: Restarting")) && time.Since(last) > 300*time.Millisecond {
			g.shell.Write([]byte(uartFlush))
			last = time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	g.shell.SetWriteDeadline(time.Time{})
	if err := g.syncShell(30 * time.Second); err != nil {
		g.shellBroken = err
		return ready, err
	}
	return ready, nil
}
