package introspect

import (
	"context"
	"sort"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
)

// BenchmarkAttach measures attach-to-ready: from an open PhysMem and the
// vCPU registers to a full symbol table and parsed BTF. It reports the
// median as well as the mean, since the shared 2-core machine is noisy.
func BenchmarkAttach(b *testing.B) {
	kernels, err := testguest.Kernels()
	if err != nil {
		b.Fatal(err)
	}
	for _, kern := range uniqueSeries(kernels) {
		b.Run(kern.Series, func(b *testing.B) {
			g := testguest.Start(b, testguest.Options{Kernel: kern, VCPUs: 2, MemoryMiB: 512})
			ctx := context.Background()
			conn, err := hypervisor.Connect(ctx, hypervisor.Config{})
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			dom, err := conn.LookupDomain(ctx, g.Name)
			if err != nil {
				b.Fatal(err)
			}
			mem, err := dom.OpenPhysMem(ctx, "")
			if err != nil {
				b.Fatal(err)
			}
			defer mem.Close()
			cpus, err := dom.CPUs(ctx)
			if err != nil {
				b.Fatal(err)
			}
			var times []time.Duration
			var last *Kernel
			b.ResetTimer()
			for b.Loop() {
				k, err := Open(ctx, mem, cpus)
				if err != nil {
					b.Fatal(err)
				}
				times = append(times, k.AttachTime)
				last = k
			}
			b.StopTimer()
			sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
			median := times[len(times)/2]
			b.ReportMetric(float64(median.Microseconds())/1000, "ms-median")
			b.Logf("%s: %d attaches, median %v, min %v; last: %s; %d symbols", kern.Release, len(times), median, times[0], last.Timings, last.Symbols.Len())
		})
	}
}
