package codearea

import "testing"

// A task caught while exiting holds nothing in the code area: with its
// stack freed (NULL) or, while it exits, unmapped, it is left out of the
// thread list; a live task keeps its stack in the list whatever it is.
func TestDropStackless(t *testing.T) {
	const mappedStack, unmappedStack = 0xffffc90000010000, 0xffffc90000020000
	mapped := func(va uint64) bool { return va >= mappedStack && va < mappedStack+threadSize }
	in := []thread{
		{pid: 1, comm: "init", stack: mappedStack, sp: mappedStack + 0x3f00},
		{pid: 178, comm: "readloop", exiting: true}, // the case seen: stack at 0x0
		{pid: 179, comm: "exiting", stack: unmappedStack, exiting: true},
		{pid: 180, comm: "exiting-mapped", stack: mappedStack, exiting: true},
		{pid: 181, comm: "unmapped-live", stack: unmappedStack},
		{pid: 182, comm: "no-stack-not-exiting"},
	}
	var pids []int
	for _, th := range dropStackless(in, mapped) {
		pids = append(pids, th.pid)
	}
	want := []int{1, 180, 181}
	if len(pids) != len(want) || pids[0] != want[0] || pids[1] != want[1] || pids[2] != want[2] {
		t.Fatalf("threads kept: %v, want %v", pids, want)
	}
}
