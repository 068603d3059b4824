package symbols

import (
	"bytes"
	"encoding/binary"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// The guest kernels' vmlinux files are the real, stripped kernels: laid out
// as in memory, they exercise the real 6.1 and 6.12 kallsyms without a
// guest. The ground truth against /proc/kallsyms is guest_test.go; these
// tests check what the image itself can confirm.

type vmlinuxImage struct {
	kernel testguest.Kernel
	img    []byte
	base   uint64
}

var (
	imagesOnce sync.Once
	images     []vmlinuxImage
	imagesErr  error
)

func loadImages(tb testing.TB) []vmlinuxImage {
	tb.Helper()
	// The kernel images come from the guest builder: not under -short.
	testguest.Need(tb)
	imagesOnce.Do(func() {
		ks, err := testguest.Kernels()
		if err != nil {
			imagesErr = err
			return
		}
		for _, k := range ks {
			img, base, err := VmlinuxImage(k.Vmlinux())
			if err != nil {
				imagesErr = err
				return
			}
			images = append(images, vmlinuxImage{k, img, base})
		}
	})
	if imagesErr != nil {
		tb.Fatalf("guest kernels are needed for this test: %v", imagesErr)
	}
	return images
}

func TestDecodeVmlinux(t *testing.T) {
	for _, vi := range loadImages(t) {
		t.Run(vi.kernel.Series, func(t *testing.T) {
			t0 := time.Now()
			tab, info, err := DecodeKallsymsInfo(vi.img, vi.base)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %d symbols in %v\n%s", vi.kernel.Release, tab.Len(), time.Since(t0), info)

			wantLayout := map[string]string{"6.1": LayoutAddressesFirst, "6.12": LayoutNumSymsFirst}[vi.kernel.Series]
			if info.Layout != wantLayout || info.Addressing != AddrRelativeAbsolutePerCPU || info.SeqsEntrySize != 3 {
				t.Errorf("%s kernel: layout %s, %s, seqs %d bytes; want %s, %s, 3 (Debian builds with KALLSYMS_ABSOLUTE_PERCPU; 6.1 has the seqs backport)",
					vi.kernel.Series, info.Layout, info.Addressing, info.SeqsEntrySize, wantLayout, AddrRelativeAbsolutePerCPU)
			}
			// The file is not relocated: the image starts at _text, which
			// is also the relative base.
			if a, err := tab.Addr("_text"); err != nil || a != vi.base || info.RelativeBase != vi.base {
				t.Errorf("_text %#x (%v), relative base %#x; image starts at %#x", a, err, info.RelativeBase, vi.base)
			}
			end, err := tab.Addr("_end")
			if err != nil || end <= vi.base || end > vi.base+uint64(len(vi.img)) {
				t.Errorf("_end %#x (%v), image ends at %#x", end, err, vi.base+uint64(len(vi.img)))
			}

			// linux_banner must point at the banner of this very kernel.
			banner := symBytes(t, tab, vi, "linux_banner", 64)
			if !bytes.HasPrefix(banner, []byte("Linux version "+vi.kernel.Release+" ")) {
				t.Errorf("linux_banner points at %q", banner)
			}

			// Function addresses must be function entries: with -mfentry
			// nearly every global function starts with a call to
			// __fentry__ (6.1's file; ftrace makes it a NOP at boot), the
			// NOP itself, or (6.12, IBT) endbr64.
			nop5 := []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
			endbr := []byte{0xf3, 0x0f, 0x1e, 0xfa}
			fentry, err := tab.Addr("__fentry__")
			if err != nil {
				t.Fatal(err)
			}
			callsFentry := func(at uint64, code []byte) bool {
				return code[0] == 0xe8 && at+5+uint64(int64(int32(binary.LittleEndian.Uint32(code[1:])))) == fentry
			}
			stext, _ := tab.Addr("_stext")
			etext, _ := tab.Addr("_etext")
			funcs, entries := 0, 0
			for _, s := range tab.All() {
				if s.Type != 'T' || s.Addr < stext || s.Addr+9 > etext || strings.HasPrefix(s.Name, "__pfx_") {
					continue
				}
				funcs++
				code := vi.img[s.Addr-vi.base:]
				if bytes.HasPrefix(code, nop5) || bytes.HasPrefix(code, endbr) || callsFentry(s.Addr, code) {
					entries++
				}
			}
			t.Logf("%d of %d global text symbols start with endbr64, the fentry NOP or a call to __fentry__", entries, funcs)
			if funcs < 10000 || entries*10 < funcs*7 {
				t.Errorf("only %d of %d global text symbols look like function entries", entries, funcs)
			}

			// 6.12's call padding: each __pfx_X is 16 bytes before an X.
			if vi.kernel.Series == "6.12" {
				pfx, matched := 0, 0
				for _, s := range tab.All() {
					name, ok := strings.CutPrefix(s.Name, "__pfx_")
					if !ok {
						continue
					}
					pfx++
					for _, f := range tab.Lookup(name) {
						if f.Addr == s.Addr+16 {
							matched++
							break
						}
					}
				}
				t.Logf("%d of %d __pfx_ symbols sit 16 bytes before their function", matched, pfx)
				if pfx < 10000 || matched != pfx {
					t.Errorf("%d of %d __pfx_ symbols are 16 bytes before their function", matched, pfx)
				}
			}
		})
	}
}

// symBytes returns n image bytes at the only symbol called name.
func symBytes(t *testing.T, tab *Table, vi vmlinuxImage, name string, n int) []byte {
	t.Helper()
	a, err := tab.Addr(name)
	if err != nil {
		t.Fatal(err)
	}
	if a < vi.base || a-vi.base+uint64(n) > uint64(len(vi.img)) {
		t.Fatalf("%s at %#x is outside the image", name, a)
	}
	return vi.img[a-vi.base : a-vi.base+uint64(n)]
}

// Live images differ from the file: init memory is freed (reads as zero
// when the reader fills unreadable pages so), the image may be cut at _end,
// or the reader may start below _text. None may change the result.
func TestDecodeVmlinuxImageVariants(t *testing.T) {
	for _, vi := range loadImages(t) {
		t.Run(vi.kernel.Series, func(t *testing.T) {
			ref, err := DecodeKallsyms(vi.img, vi.base)
			if err != nil {
				t.Fatal(err)
			}
			addr := func(name string) uint64 {
				a, err := ref.Addr(name)
				if err != nil {
					t.Fatal(err)
				}
				return a
			}
			initBegin, initEnd, end := addr("__init_begin"), addr("__init_end"), addr("_end")

			holes := bytes.Clone(vi.img)
			clear(holes[initBegin-vi.base : initEnd-vi.base])
			// and the .bss, which a reader may also fail to read
			clear(holes[addr("__bss_start")-vi.base:])
			cut := vi.img[:end-vi.base]
			pad := make([]byte, 2<<20+4096)
			shifted := append(pad, vi.img...)

			for _, v := range []struct {
				name string
				img  []byte
				base uint64
			}{
				{"init and bss zero-filled", holes, vi.base},
				{"cut at _end", cut, vi.base},
				{"starting 2 MiB+4 KiB below _text", shifted, vi.base - uint64(len(pad))},
			} {
				got, err := DecodeKallsyms(v.img, v.base)
				if err != nil {
					t.Errorf("%s: %v", v.name, err)
					continue
				}
				if !equalSyms(got.All(), ref.All()) {
					t.Errorf("%s: decoded table differs", v.name)
				}
			}
		})
	}
}

func BenchmarkDecodeKallsyms(b *testing.B) {
	for _, vi := range loadImages(b) {
		b.Run(vi.kernel.Series, func(b *testing.B) {
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				tab, err := DecodeKallsyms(vi.img, vi.base)
				if err != nil {
					b.Fatal(err)
				}
				n = tab.Len()
			}
			b.ReportMetric(float64(n), "symbols")
		})
	}
}

// BenchmarkFirstLookup is the one-off cost of the name index, built on the
// first Lookup/Addr of a decoded table.
func BenchmarkFirstLookup(b *testing.B) {
	for _, vi := range loadImages(b) {
		b.Run(vi.kernel.Series, func(b *testing.B) {
			ref, err := DecodeKallsyms(vi.img, vi.base)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				tab := NewTable(ref.All())
				if _, err := tab.Addr("vfs_read"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
