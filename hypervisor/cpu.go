package hypervisor

// CPUState is the part of a vCPU's register state hvpatch needs: where it
// executes, and how it translates addresses. Live guests take it from the
// QEMU monitor (HMP "info registers -a"); ELF dumps from QEMU's per-CPU notes.
type CPUState struct {
	Index   int
	RIP     uint64
	RSP     uint64
	CR0     uint64
	CR3     uint64
	CR4     uint64
	EFER    uint64
	GDTBase uint64
	IDTBase uint64
	GSBase  uint64
	// KernelGSBase is MSR_KERNEL_GS_BASE: the other GS base, the kernel's
	// per-CPU base while the vCPU runs user code.
	KernelGSBase uint64
	CPL          int // current privilege level (from CS)
}

// CR4 bits that change how addresses translate.
const (
	CR4PAE   = 1 << 5
	CR4LA57  = 1 << 12
	CR4PCIDE = 1 << 17
)

// InKernel reports whether the vCPU was running kernel code.
func (c CPUState) InKernel() bool { return c.CPL == 0 }
