package hypervisor

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

func benchGuest(b *testing.B, vcpus int) *liveGuest {
	k, err := testguest.KernelSeries("6.1")
	if err != nil {
		b.Fatal(err)
	}
	g := testguest.Start(b, testguest.Options{Kernel: k, VCPUs: vcpus, MemoryMiB: 512})
	lg, err := openLive(b, g)
	if err != nil {
		b.Fatal(err)
	}
	return lg
}

// BenchmarkRead4K reads 4 KiB at random page-aligned guest-physical
// addresses through each backend and through libvirt's DomainMemoryPeek.
func BenchmarkRead4K(b *testing.B) {
	lg := benchGuest(b, 2)
	regs, err := lg.d.MemoryMap(lg.ctx)
	if err != nil {
		b.Fatal(err)
	}
	addrs := make([]uint64, 1024)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range addrs {
		r := regs[rng.IntN(len(regs))]
		addrs[i] = (r.GPA + rng.Uint64N(r.Size-4096)) &^ 0xfff
	}
	buf := make([]byte, 4096)
	for _, backend := range []string{"memfd", "process"} {
		m, err := lg.d.OpenPhysMem(lg.ctx, backend)
		if err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		b.Run(backend, func(b *testing.B) {
			b.SetBytes(4096)
			for i := 0; i < b.N; i++ {
				if err := m.ReadPhys(addrs[i%len(addrs)], buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("peek", func(b *testing.B) {
		b.SetBytes(4096)
		for i := 0; i < b.N; i++ {
			if err := lg.d.MemoryPeek(lg.ctx, addrs[i%len(addrs)], buf); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkFreeze measures the freeze window (vCPUs stopped, host side)
// of the ptrace and libvirt suspend freezers, on 1- and 2-vCPU guests.
// ns/op includes the set-up around the window; window-median-µs is the
// figure that matters.
func BenchmarkFreeze(b *testing.B) {
	for _, method := range []string{"ptrace", "suspend"} {
		b.Run(method, func(b *testing.B) {
			for _, n := range []int{1, 2} {
				lg := benchGuest(b, n)
				var f Freezer = lg.d.SuspendFreezer()
				if method == "ptrace" {
					var err error
					if f, err = lg.d.PtraceFreezer(lg.ctx); err != nil {
						b.Fatal(err)
					}
				}
				b.Run(fmt.Sprintf("%dvcpu", n), func(b *testing.B) {
					windows := make([]time.Duration, 0, b.N)
					for i := 0; i < b.N; i++ {
						fz, err := f.Freeze(lg.ctx)
						if err != nil {
							b.Fatal(err)
						}
						w, err := fz.Thaw()
						if err != nil {
							b.Fatal(err)
						}
						windows = append(windows, w)
					}
					slices.Sort(windows)
					b.ReportMetric(float64(windows[len(windows)/2].Nanoseconds())/1e3, "window-median-µs")
					b.ReportMetric(float64(windows[len(windows)*9/10].Nanoseconds())/1e3, "window-p90-µs")
					b.ReportMetric(float64(windows[0].Nanoseconds())/1e3, "window-min-µs")
				})
				lg.g.Destroy()
			}
		})
	}
}
