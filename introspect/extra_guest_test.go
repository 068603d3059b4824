package introspect

import (
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// TestGuestExtraKernels attaches to a guest of each other Debian series
// (5.10, 6.12+deb13, 7.x: testguest.ExtraKernels) and checks the decoded
// kallsyms and the module symbols against the guest's /proc/kallsyms, with
// the test modules of the kernel's own package loaded.
func TestGuestExtraKernels(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	kernels, err := testguest.ExtraKernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, kern := range kernels {
		t.Run(kern.Series, func(t *testing.T) {
			lk := attachGuest(t, kern)
			loadTestModules(t, lk)
			t.Run("Kallsyms", func(t *testing.T) { testKallsyms(t, lk) })
			t.Run("ModuleSymbols", func(t *testing.T) { testModuleSymbols(t, lk) })
			t.Run("Modules", func(t *testing.T) { testModules(t, lk) })
		})
	}
}

// TestGuestModuleSymbols is the module-symbol check on the kernels.txt
// guests (6.1, 6.12).
func TestGuestModuleSymbols(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, kern := range uniqueSeries(kernels) {
		t.Run(kern.Series, func(t *testing.T) {
			lk := attachGuest(t, kern)
			loadTestModules(t, lk)
			t.Run("ModuleSymbols", func(t *testing.T) { testModuleSymbols(t, lk) })
		})
	}
}

func loadTestModules(t *testing.T, lk *liveKernel) {
	t.Helper()
	for _, m := range []string{"crc-itu-t", "dummy", "nls_utf8"} {
		if err := lk.g.LoadModule(m); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Now()
	var err error
	if lk.kallsyms, err = lk.g.Kallsyms(); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest /proc/kallsyms: %d lines in %v", len(lk.kallsyms), time.Since(t0))
}

// testModuleSymbols: every module line of /proc/kallsyms (not BPF, ftrace
// or kprobe entries) equals one ModuleSymbols entry, in the same order.
func testModuleSymbols(t *testing.T, lk *liveKernel) {
	var want []string
	for _, e := range lk.kallsyms {
		switch e.Module {
		case "", "bpf", "__builtin__ftrace", "__builtin__kprobes":
			continue
		}
		want = append(want, fmt.Sprintf("%016x %c %s\t[%s]", e.Addr, e.Type, e.Name, e.Module))
	}
	t0 := time.Now()
	syms, err := lk.k.ModuleSymbols()
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(t0)
	var got []string
	perModule := map[string]int{}
	for _, s := range syms {
		got = append(got, fmt.Sprintf("%016x %c %s\t[%s]", s.Addr, s.Type, s.Name, s.Module))
		perModule[s.Module]++
	}
	if len(want) == 0 {
		t.Fatal("the guest lists no module symbols")
	}
	diff := 0
	for i := 0; i < max(len(got), len(want)); i++ {
		var g, w string
		if i < len(got) {
			g = got[i]
		}
		if i < len(want) {
			w = want[i]
		}
		if g != w {
			if diff < 15 {
				t.Errorf("line %d: hvpatch %q, guest %q", i, g, w)
			}
			diff++
		}
	}
	if diff > 0 {
		sort.Strings(got)
		sort.Strings(want)
		t.Errorf("%d of %d module lines differ (hvpatch %d lines)", diff, len(want), len(got))
	}
	t.Logf("%d module symbols identical to /proc/kallsyms (%v), read in %v", len(got)-diff, perModule, elapsed)
}
