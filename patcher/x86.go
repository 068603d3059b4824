package patcher

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/hvpatch/hvpatch/codearea"
)

// FentryNop is the 5-byte NOP (nopl 0x0(%rax,%rax,1)) that dynamic ftrace
// leaves at the entry of every traceable function once it has replaced the
// compiler's "call __fentry__", on every kernel since 5.15. Older kernels
// chose the NOP for the CPU at boot: the sites then hold another of
// codearea.FentryNops. An edit records the bytes it found and a revert puts
// exactly those back.
var FentryNop = codearea.FentryNop

// IsFentryNop reports whether a fentry site holds one of the 5-byte NOPs a
// kernel writes there (codearea.FentryNops).
func IsFentryNop(b []byte) bool { return codearea.IsFentryNop(b) }

// nopProbes are functions present in every kernel whose fentry sites show
// which NOP form the guest writes; see guestFentryNop.
var nopProbes = []string{"cmdline_proc_show", "meminfo_proc_show", "version_proc_show", "vfs_fsync", "schedule_timeout",
	"msleep", "kfree_sensitive", "seq_puts", "single_open", "proc_create_single_data"}

// guestFentryNop is the NOP form the guest kernel put at its fentry sites,
// for a site that holds no NOP now (already patched, not in the journal):
// the form most of a few well-known functions hold, FentryNop when none
// does.
func guestFentryNop(t Target) []byte {
	count := make([]int, len(codearea.FentryNops))
	for _, name := range nopProbes {
		for _, s := range t.Symbols(name) {
			head := make([]byte, len(Endbr64)+SiteLen)
			if t.ReadVirt(s.Addr, head) != nil {
				continue
			}
			site := head[:SiteLen]
			if bytes.HasPrefix(head, Endbr64) {
				site = head[len(Endbr64):]
			}
			for i, n := range codearea.FentryNops {
				if bytes.Equal(site, n) {
					count[i]++
				}
			}
		}
	}
	best := 0
	for i := range count {
		if count[i] > count[best] {
			best = i
		}
	}
	return append([]byte(nil), codearea.FentryNops[best]...)
}

// Endbr64 starts every indirectly callable function on IBT kernels; the
// fentry site follows it.
var Endbr64 = []byte{0xf3, 0x0f, 0x1e, 0xfa}

// SiteLen is the size of the fentry site.
const SiteLen = 5

// ReturnSequence builds the bytes that replace the fentry NOP to make a
// function return at once. They are exactly SiteLen long and end in int3
// padding that never executes (ret leaves first); int3 is what the kernel
// itself puts after ret against straight-line speculation.
//
// The sequence returns with a bare ret, not through __x86_return_thunk.
// Kernels that do not need the return thunk on the CPU they run on already
// rewrite every "jmp __x86_return_thunk" into "ret; int3" at boot (seen in
// both test kernels' memory under QEMU), so for them this is what the
// kernel would do. On CPUs that need the thunk (retbleed), this one return
// skips it: a "jmp rel32" to the thunk does not fit in 5 bytes after
// setting rax. For a kill switch, which turns a function off, that is the
// accepted trade-off; it is documented for operators.
func ReturnSequence(value int64, void bool) ([]byte, error) {
	switch {
	case void:
		return []byte{0xc3, 0xcc, 0xcc, 0xcc, 0xcc}, nil // ret
	case value == 0:
		return []byte{0x31, 0xc0, 0xc3, 0xcc, 0xcc}, nil // xor %eax,%eax; ret
	case value >= -128 && value <= 127:
		// push $imm8 sign-extends to 64 bits, so -1 becomes all ones in rax
		// as a long or an int return value wants it.
		return []byte{0x6a, byte(int8(value)), 0x58, 0xc3, 0xcc}, nil // push $v; pop %rax; ret
	}
	return nil, fmt.Errorf("return value %d does not fit the 5-byte fentry site (supported: -128..127)", value)
}

// isReturnSequence reports whether b is one of ReturnSequence's outputs.
func isReturnSequence(b []byte) bool {
	if len(b) != SiteLen {
		return false
	}
	if bytes.Equal(b, []byte{0xc3, 0xcc, 0xcc, 0xcc, 0xcc}) || bytes.Equal(b, []byte{0x31, 0xc0, 0xc3, 0xcc, 0xcc}) {
		return true
	}
	return b[0] == 0x6a && b[2] == 0x58 && b[3] == 0xc3 && b[4] == 0xcc
}

// siteTaken explains why bytes at a fentry site at va are not a fentry
// NOP, naming the call or jump target when there is one. resolve
// may be nil.
func siteTaken(site []byte, va uint64, resolve func(uint64) string) string {
	target := func() string {
		t := va + SiteLen + uint64(int64(int32(binary.LittleEndian.Uint32(site[1:5]))))
		if resolve != nil {
			if name := resolve(t); name != "" {
				return fmt.Sprintf("%#x <%s>", t, name)
			}
		}
		return fmt.Sprintf("%#x", t)
	}
	switch {
	case site[0] == 0xe8:
		return fmt.Sprintf("taken by ftrace: it calls %s (function tracing, a kprobe or BPF trampoline is attached)", target())
	case site[0] == 0xe9:
		return fmt.Sprintf("taken by a livepatch or ftrace direct call: it jumps to %s", target())
	case isReturnSequence(site):
		return "already holds a return sequence written by hvpatch"
	case site[0] == 0xcc:
		return "holds an int3 (a kprobe or text_poke in progress)"
	}
	return "holds unexpected bytes"
}
