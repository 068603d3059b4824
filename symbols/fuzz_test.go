package symbols

import (
	"math/rand/v2"
	"testing"
	"time"
)

// FuzzDecodeKallsyms feeds arbitrary bytes, and damaged real-looking tables,
// to the decoder: it must return a table or an error, never panic, and
// whatever it accepts must hold together.
func FuzzDecodeKallsyms(f *testing.F) {
	rng := rand.New(rand.NewPCG(5, 5))
	for i, l := range synthLayouts {
		syms := synthSymbols(rng, 100+i*60, l.addressing == AddrRelativeAbsolutePerCPU, i%2 == 0, l.ptr)
		base := uint64(0xffffffff81000000)
		if l.ptr == 4 {
			base = 0xc1000000
		}
		si := encodeKallsyms(syms, l, base, junk(rng, 64+i), junk(rng, 32))
		f.Add(si.img, base)
	}
	f.Add([]byte{}, uint64(0))
	f.Add(make([]byte, 4096), uint64(0xffffffff81000000))
	f.Fuzz(func(t *testing.T, img []byte, base uint64) {
		t0 := time.Now()
		tab, info, err := DecodeKallsymsInfo(img, base)
		if d := time.Since(t0); d > 2*time.Second {
			t.Errorf("decoding %d bytes took %v", len(img), d)
		}
		if err != nil {
			if tab != nil || info != nil {
				t.Errorf("error %v with a result", err)
			}
			return
		}
		if tab.Len() != info.NumSyms || tab.Len() == 0 {
			t.Errorf("%d symbols, info says %d", tab.Len(), info.NumSyms)
		}
		all := tab.All()
		for i, s := range all {
			if i > 0 && s.Addr < all[i-1].Addr {
				t.Fatalf("symbol %d below its predecessor", i)
			}
			if s.Name == "" || !isTypeLetter(s.Type) {
				t.Fatalf("symbol %d: %+v", i, s)
			}
		}
	})
}
