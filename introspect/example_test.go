package introspect_test

import (
	"context"
	"fmt"
	"log"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
)

// Attach to the kernel of a running libvirt domain and list its processes
// and modules. The same Open works on an offline dump:
// d, _ := hypervisor.OpenELFDump("guest.elf"); introspect.Open(ctx, d, d.CPUs()).
func Example() {
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{})
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	dom, err := conn.LookupDomain(ctx, "my-guest")
	if err != nil {
		log.Fatal(err)
	}
	cpus, err := dom.CPUs(ctx)
	if err != nil {
		log.Fatal(err)
	}
	mem, err := dom.OpenPhysMem(ctx, "")
	if err != nil {
		log.Fatal(err)
	}
	defer mem.Close()

	k, err := introspect.Open(ctx, mem, cpus)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s, KASLR slide %#x, %d symbols, ready in %v\n", k.Release, k.Slide, k.Symbols.Len(), k.AttachTime)

	tasks, err := k.Tasks()
	if err != nil {
		log.Fatal(err)
	}
	for _, t := range tasks {
		fmt.Printf("%6d %6d %s %s\n", t.PID, t.PPID, t.StateLetter(), t.Comm)
	}

	// Struct layouts come from the guest's own BTF.
	off, err := k.Offset("task_struct.comm")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("comm is at offset", off)
}
