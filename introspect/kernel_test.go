package introspect

import (
	"context"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
)

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	pt := newPageTables(4<<20, 3<<20, false)
	// Something mapped, but nothing in the kernel-image region.
	pt.mapPage(0xffff888000000000, 0, Size2M, rw, rw)
	paging := uint64(1<<31 | 1)
	for _, c := range []struct {
		name string
		cpus []hypervisor.CPUState
		want string
	}{
		{"no vCPUs", nil, "no vCPU state"},
		{"paging off", []hypervisor.CPUState{{Index: 0, CR0: 1, CR3: pt.root}}, "paging off"},
		{"no image", []hypervisor.CPUState{{Index: 0, CR0: paging, CR3: pt.root}}, "no kernel image mapped"},
		{"CR3 outside RAM", []hypervisor.CPUState{{Index: 1, CR0: paging, CR3: 0x7f000000}}, "unreadable"},
	} {
		_, err := Open(ctx, pt.mem, c.cpus)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Open error = %v, want one containing %q", c.name, err, c.want)
		}
	}
}

func TestLocatePrefersKernelPGDUnderPTI(t *testing.T) {
	// Two PGDs in adjacent pages, as PTI allocates them: the kernel one
	// maps the whole image, the user one (bit 12 set) only an entry page.
	pt := newPageTables(8<<20, 6<<20, false)
	pt.next = 6<<20 + Size4K
	kernelRoot := pt.root
	userRoot := kernelRoot + Size4K
	pt.next += Size4K
	for i := uint64(0); i < 3; i++ {
		pt.mapPage(0xffffffffa0000000+i*Size2M, 0x1000000+i*Size2M, Size2M, rw, ptePresent)
	}
	pt.root = userRoot
	pt.mapPage(0xffffffffa0200000, 0x1200000, Size4K, rw, ptePresent)
	k := &Kernel{Mem: pt.mem}
	cpu := hypervisor.CPUState{CR0: 1 << 31, CR3: userRoot | 0x803} // user mode: user PGD, a PCID
	maps, err := k.locate([]hypervisor.CPUState{cpu})
	if err != nil {
		t.Fatal(err)
	}
	if k.CR3 != kernelRoot || k.TextStart != 0xffffffffa0000000 || k.PhysBase != 0x1000000 ||
		k.Slide != 0xffffffffa0000000-DefaultText || len(maps) != 1 || maps[0].Size != 3*Size2M {
		t.Errorf("locate chose CR3 %#x text %#x phys %#x slide %#x maps %+v", k.CR3, k.TextStart, k.PhysBase, k.Slide, maps)
	}
}

func TestRodataRun(t *testing.T) {
	m := func(va, size uint64, w, nx bool) Mapping {
		return Mapping{VA: va, Size: size, Translation: Translation{Writable: w, NX: nx}}
	}
	maps := []Mapping{
		m(0x0, 0xe00000, false, false),      // text
		m(0xe00000, 0x2000, true, true),     // data
		m(0x1000000, 0x800000, false, true), // rodata, 2 MiB pages
		m(0x1800000, 0x27000, false, true),  // rodata tail, 4 KiB pages
		m(0x1827000, 0x1000, true, true),
		m(0x1900000, 0x1000, false, true), // a lone read-only page later on
	}
	if got := rodataRun(maps); got.VA != 0x1000000 || got.Size != 0x827000 {
		t.Errorf("rodataRun = %#x+%#x, want 0x1000000+0x827000", got.VA, got.Size)
	}
}

func TestStateLetter(t *testing.T) {
	for state, want := range map[uint]string{
		0: "R", 1: "S", 2: "D", 4: "T", 8: "t", 16: "X", 32: "Z", 64: "P",
		0x402:       "I", // TASK_IDLE
		0x102:       "D", // TASK_KILLABLE
		0x2001:      "S", // interruptible and freezable
		0x1 | 32<<0: "Z", // exit_state ZOMBIE or'ed in
	} {
		if got := (Task{State: state}).StateLetter(); got != want {
			t.Errorf("StateLetter(%#x) = %s, want %s", state, got, want)
		}
	}
}
