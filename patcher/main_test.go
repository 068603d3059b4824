package patcher

import (
	"fmt"
	"os"
	"testing"
)

// TestMain keeps the host-wide domain locks of the tests in a directory of
// their own: the fixtures share UUIDs, and other test binaries (or a real
// hvpatchd) may be using /run/hvpatch/locks at the same time.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hvpatch-test-locks-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("HVPATCH_LOCK_DIR", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
