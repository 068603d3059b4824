package codearea

import (
	"testing"

	"github.com/hvpatch/hvpatch/introspect"
)

// x86-64 modules live in MODULES_VADDR..MODULES_END
// (0xffffffffc0000000..0xfffffffffe000000 with 4- and 5-level paging); the
// code area is in the kernel image region (introspect.KernelImageStart..
// KernelImageEnd). A jump from any module site reaches any address of that
// region in rel32, both ways: a replace edit on a module function needs no
// area of its own.
func TestModuleRegionReachesCodeArea(t *testing.T) {
	const modulesStart, modulesEnd = 0xffffffffc0000000, 0xfffffffffe000000
	for _, from := range []uint64{modulesStart, modulesEnd - 5} {
		for _, to := range []uint64{introspect.KernelImageStart, introspect.KernelImageEnd - 1} {
			b, err := JumpTo(from, to)
			if err != nil {
				t.Fatalf("module site %#x -> code area %#x: %v", from, to, err)
			}
			if got, ok := JumpTarget(from, b); !ok || got != to {
				t.Fatalf("jump % x at %#x leads to %#x, want %#x", b, from, got, to)
			}
		}
	}
	// The direct map is out of reach: JumpTo says so.
	if _, err := JumpTo(modulesStart, 0xffff888000000000); err == nil {
		t.Fatal("a jump to the direct map was encoded")
	}
}
