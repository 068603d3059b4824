package symbols_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/symbols"
)

// TestDecodedMatchesGuestKallsyms boots each guest kernel and compares the
// table decoded from its vmlinux file, moved by the guest's KASLR slide,
// with the guest's own /proc/kallsyms.
//
// How the two sides line up:
//   - Only entries of the kernel image (no [module] column) are compared:
//     module, BPF, ftrace and kprobe symbols are not in the image's table.
//     A module (dummy) is loaded so that such entries exist; none of them
//     may resolve into the image's table.
//   - Per-CPU symbols are absolute (type A, zero-based offsets): KASLR does
//     not move them and WithSlide leaves them alone; they are compared as
//     any other entry, so their values must match exactly.
//   - Type letters are compared as they are: for the kernel image,
//     /proc/kallsyms prints the letter stored in the table.
//
// Live-memory decoding (the image read through the hypervisor, with the
// relocated relative_base) is exercised by introspect/.
func TestDecodedMatchesGuestKallsyms(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range kernels {
		t.Run(k.Series, func(t *testing.T) {
			t.Parallel()
			img, base, err := symbols.VmlinuxImage(k.Vmlinux())
			if err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			file, info, err := symbols.DecodeKallsymsInfo(img, base)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: decoded %d symbols in %v\n%s", k.Release, file.Len(), time.Since(t0), info)

			g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 1, MemoryMiB: 512})
			// A loaded module puts entries in /proc/kallsyms that the
			// image's table does not have: the comparison must leave them
			// out, and the image table must not claim their addresses.
			if err := g.LoadModule("dummy"); err != nil {
				t.Fatal(err)
			}
			t1 := time.Now()
			guest, err := g.Kallsyms()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("read %d /proc/kallsyms lines in %v", len(guest), time.Since(t1))

			var want []symbols.Symbol
			var moduleSyms []testguest.KallsymsEntry
			for _, e := range guest {
				if e.Module != "" {
					moduleSyms = append(moduleSyms, e)
					continue
				}
				want = append(want, symbols.Symbol{Name: e.Name, Addr: e.Addr, Type: e.Type})
			}
			guestText := lookupOne(t, want, "_text")
			fileText, err := file.Addr("_text")
			if err != nil {
				t.Fatal(err)
			}
			slide := guestText - fileText
			t.Logf("guest _text %#x, file _text %#x, slide %#x; %d module/other entries not compared", guestText, fileText, slide, len(moduleSyms))
			if slide == 0 {
				t.Errorf("slide is 0: the guest kernel was expected to run with KASLR")
			}
			live := file.WithSlide(slide)
			got := live.All()

			dummy := 0
			for _, e := range moduleSyms {
				if e.Module != "dummy" {
					continue
				}
				dummy++
				if s, off, ok := live.Resolve(e.Addr); ok {
					t.Errorf("module symbol %s [%s] at %#x resolves into the kernel image as %s+%#x", e.Name, e.Module, e.Addr, s.Name, off)
				}
			}
			if dummy == 0 {
				t.Errorf("no [dummy] entries in /proc/kallsyms after loading the module")
			}

			if len(got) != len(want) {
				t.Errorf("count: decoded %d symbols, guest /proc/kallsyms lists %d kernel-image symbols", len(got), len(want))
			}
			// /proc/kallsyms lists the table in its own (address) order, so
			// entries compare index by index.
			mismatches := 0
			for i := 0; i < min(len(got), len(want)); i++ {
				if got[i] != want[i] {
					if mismatches < 20 {
						t.Errorf("entry %d: decoded %s, guest %s", i, fmtSym(got[i]), fmtSym(want[i]))
					}
					mismatches++
				}
			}
			if mismatches > 0 {
				t.Errorf("%d of %d entries differ", mismatches, len(want))
			}
			absolute := 0
			for _, s := range want {
				if s.Type == 'A' {
					absolute++
				}
			}
			if absolute != info.NumAbsolute {
				t.Errorf("guest lists %d absolute (type A) symbols, decoder counted %d absolute values", absolute, info.NumAbsolute)
			}
			t.Logf("%d symbols identical (name, address, type), %d of them absolute per-CPU", len(want)-mismatches, absolute)
		})
	}
}

func lookupOne(t *testing.T, syms []symbols.Symbol, name string) uint64 {
	t.Helper()
	for _, s := range syms {
		if s.Name == name {
			return s.Addr
		}
	}
	t.Fatalf("guest /proc/kallsyms has no %s", name)
	return 0
}

func fmtSym(s symbols.Symbol) string { return fmt.Sprintf("%016x %c %s", s.Addr, s.Type, s.Name) }
