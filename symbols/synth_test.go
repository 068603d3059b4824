package symbols

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"testing"
)

// This file encodes symbol tables the way the kernel's scripts/kallsyms lays
// them out, for layouts no test guest runs (4.x absolute addresses, 4.6+
// base-relative, 6.2/6.3 seqs_of_names, 32-bit labels), with its own simple
// token compression, and checks that DecodeKallsyms recovers exactly what
// was encoded, from among junk.

type synthLayout struct {
	name         string
	numSymsFirst bool   // 6.4+ order
	addressing   string // AddrAbsolute, AddrRelative, AddrRelativeAbsolutePerCPU, AddrPlaceRelative
	seqsEntry    int    // kallsyms_seqs_of_names entry size: 0 (absent), 3 or 4
	ptr          int    // label alignment and pointer size: 8 or 4 (7.0+: 4-aligned labels on a 64-bit kernel)
}

// wide says whether the layout's kernel is 64-bit.
func (l synthLayout) wide() bool { return l.ptr == 8 || l.addressing == AddrPlaceRelative }

var synthLayouts = []synthLayout{
	{"4.x-absolute", false, AddrAbsolute, 0, 8},
	{"4.x-absolute-32bit", false, AddrAbsolute, 0, 4},
	{"4.6-base-relative", false, AddrRelative, 0, 8},
	{"5.x-absolute-percpu", false, AddrRelativeAbsolutePerCPU, 0, 8},
	{"5.x-base-relative-32bit", false, AddrRelative, 0, 4},
	{"6.2-seqs-u32", false, AddrRelativeAbsolutePerCPU, 4, 8},
	{"6.3-seqs-3byte", false, AddrRelativeAbsolutePerCPU, 3, 8},
	{"6.4-num_syms-first", true, AddrRelativeAbsolutePerCPU, 3, 8},
	{"6.4-num_syms-first-relative", true, AddrRelative, 3, 8},
	{"6.4-num_syms-first-absolute", true, AddrAbsolute, 0, 8},
	{"7.0-place-relative", true, AddrPlaceRelative, 3, 4},
}

// synthSymbols makes a kernel-like symbol list: per-CPU absolutes first
// when asked, then text and data in address order, with duplicate names,
// aliases at one address, and a few names long enough to need the two-byte
// length of 6.1+.
func synthSymbols(rng *rand.Rand, n int, percpu bool, long bool, ptr int) []Symbol {
	words := []string{"sys", "do", "tcp", "ext4", "init", "read", "write", "page", "irq", "sched", "mm", "vfs", "net", "dev", "x64", "kmalloc", "lock", "unlock", "rcu", "bpf"}
	var syms []Symbol
	if percpu {
		for i, a := 0, uint64(0); i < 12; i++ {
			syms = append(syms, Symbol{Name: fmt.Sprintf("percpu_%d_%s", i, words[i%len(words)]), Addr: a, Type: 'A'})
			a += uint64(rng.IntN(3)) * 0x40
		}
	}
	addr := uint64(0xffffffff81000000)
	if ptr == 4 {
		addr = 0xc1000000
	}
	types := []byte("TTTtttttDdRrBbWVt")
	for i := 0; len(syms) < n; i++ {
		var b strings.Builder
		if rng.IntN(4) == 0 {
			b.WriteString("__")
		}
		for w := 0; w < 1+rng.IntN(4); w++ {
			if w > 0 {
				b.WriteByte('_')
			}
			b.WriteString(words[rng.IntN(len(words))])
		}
		fmt.Fprintf(&b, "%d", rng.IntN(10000))
		name := b.String()
		if long && i%97 == 5 {
			// A name whose compressed form exceeds 127 bytes.
			for b.Len() < 300 {
				b.WriteByte("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"[rng.IntN(63)])
			}
			name = b.String()
		}
		if i%50 == 7 && len(syms) > 0 {
			name = syms[len(syms)-1-rng.IntN(min(len(syms), 30))].Name // a duplicate name
		}
		syms = append(syms, Symbol{Name: name, Addr: addr, Type: types[rng.IntN(len(types))]})
		if rng.IntN(10) != 0 { // sometimes an alias at the same address
			addr += uint64(1 + rng.IntN(0x400))
		}
	}
	return syms
}

// synthTokens compresses type+name strings: every character used stands for
// itself, and the most frequent pairs, then pairs of those, take the codes
// left over, the kernel's greedy idea in a simpler form.
type synthTokens struct {
	tok [256]string
}

func newSynthTokens(strs []string) *synthTokens {
	st := &synthTokens{}
	used := [256]bool{}
	for _, s := range strs {
		for i := 0; i < len(s); i++ {
			used[s[i]] = true
			st.tok[s[i]] = s[i : i+1]
		}
	}
	counts := map[string]int{}
	for _, s := range strs {
		for i := 0; i+2 <= len(s); i++ {
			counts[s[i:i+2]]++
		}
		for i := 0; i+4 <= len(s); i += 2 {
			counts[s[i:i+4]]++
		}
	}
	cands := make([]string, 0, len(counts))
	for k := range counts {
		cands = append(cands, k)
	}
	sort.Slice(cands, func(i, j int) bool {
		ci, cj := counts[cands[i]]*len(cands[i]), counts[cands[j]]*len(cands[j])
		if ci != cj {
			return ci > cj
		}
		return cands[i] < cands[j]
	})
	next := 0
	for c := 255; c >= 0; c-- {
		if used[c] || next >= len(cands) {
			continue
		}
		st.tok[c] = cands[next]
		next++
	}
	return st
}

// compress encodes s greedily, longest token first.
func (st *synthTokens) compress(s string) []byte {
	var out []byte
	for len(s) > 0 {
		best, bestLen := -1, 0
		for c, t := range st.tok {
			if len(t) > bestLen && strings.HasPrefix(s, t) {
				best, bestLen = c, len(t)
			}
		}
		out = append(out, byte(best))
		s = s[bestLen:]
	}
	return out
}

// synthImage is an encoded table in its image, with where things went.
type synthImage struct {
	img  []byte
	base uint64
	info KallsymsInfo
	// stream offsets (image offsets) for corruption tests
	markersOff, namesOff, addrOff int
}

func encodeKallsyms(syms []Symbol, l synthLayout, base uint64, junkBefore, junkAfter []byte) *synthImage {
	si := &synthImage{base: base}
	var out []byte
	align := func() {
		for (base+uint64(len(out)))%uint64(l.ptr) != 0 {
			out = append(out, 0)
		}
	}
	le32 := func(v uint32) { out = binary.LittleEndian.AppendUint32(out, v) }
	ptrv := func(v uint64) {
		if l.ptr == 8 {
			out = binary.LittleEndian.AppendUint64(out, v)
		} else {
			le32(uint32(v))
		}
	}
	va := func() uint64 { return base + uint64(len(out)) }
	n := len(syms)

	full := make([]string, n)
	for i, s := range syms {
		full[i] = string(s.Type) + s.Name
	}
	st := newSynthTokens(full)

	var relBase uint64
	numAbs := 0
	writeAddresses := func() {
		align()
		si.addrOff = len(out)
		si.info.AddressesAddr = va()
		switch l.addressing {
		case AddrAbsolute:
			for _, s := range syms {
				ptrv(s.Addr)
			}
			return
		case AddrPlaceRelative:
			// ".long _text - . + off": the address minus the entry's own.
			for _, s := range syms {
				le32(uint32(int32(int64(s.Addr - va()))))
			}
			return
		case AddrRelative:
			relBase = syms[0].Addr
			for _, s := range syms {
				le32(uint32(s.Addr - relBase))
			}
		case AddrRelativeAbsolutePerCPU:
			for _, s := range syms {
				if s.Type != 'A' {
					relBase = s.Addr
					break
				}
			}
			for _, s := range syms {
				if s.Type == 'A' {
					le32(uint32(s.Addr))
					numAbs++
				} else {
					le32(uint32(int32(int64(relBase - s.Addr - 1))))
				}
			}
		}
		align()
		si.info.RelativeBaseAddr = va()
		ptrv(relBase)
	}
	writeNamesAndMarkers := func() {
		align()
		si.info.NumSymsAddr = va()
		le32(uint32(n))
		align()
		si.namesOff = len(out)
		si.info.NamesAddr = va()
		var markers []uint32
		start := len(out)
		for i := range syms {
			if i%256 == 0 {
				markers = append(markers, uint32(len(out)-start))
			}
			c := st.compress(full[i])
			if len(c) > 0x7f {
				out = append(out, byte(len(c)&0x7f|0x80), byte(len(c)>>7))
			} else {
				out = append(out, byte(len(c)))
			}
			out = append(out, c...)
		}
		si.info.NamesSize = len(out) - start
		align()
		si.markersOff = len(out)
		si.info.MarkersAddr = va()
		for _, m := range markers {
			le32(m)
		}
	}
	writeSeqs := func() {
		if l.seqsEntry == 0 {
			return
		}
		order := make([]int, n)
		for i := range order {
			order[i] = i
		}
		sort.SliceStable(order, func(a, b int) bool { return syms[order[a]].Name < syms[order[b]].Name })
		align()
		si.info.SeqsOfNamesAddr = va()
		si.info.SeqsEntrySize = l.seqsEntry
		for _, seq := range order {
			if l.seqsEntry == 3 {
				out = append(out, byte(seq>>16), byte(seq>>8), byte(seq))
			} else {
				le32(uint32(seq))
			}
		}
	}
	writeTokens := func() {
		align()
		si.info.TokenTableAddr = va()
		var idx [256]uint16
		start := len(out)
		for c, t := range st.tok {
			idx[c] = uint16(len(out) - start)
			out = append(out, t...)
			out = append(out, 0)
		}
		align()
		si.info.TokenIndexAddr = va()
		for _, v := range idx {
			out = binary.LittleEndian.AppendUint16(out, v)
		}
	}

	out = append(out, junkBefore...)
	if l.numSymsFirst {
		writeNamesAndMarkers()
		writeTokens()
		writeAddresses()
		writeSeqs()
	} else {
		writeAddresses()
		writeNamesAndMarkers()
		writeSeqs()
		writeTokens()
	}
	out = append(out, junkAfter...)
	si.img = out

	si.info.NumSyms = n
	si.info.NumAbsolute = numAbs
	si.info.RelativeBase = relBase
	si.info.Addressing = l.addressing
	si.info.PointerSize = l.ptr
	si.info.Layout = LayoutAddressesFirst
	if l.numSymsFirst {
		si.info.Layout = LayoutNumSymsFirst
	}
	if l.addressing == AddrAbsolute || l.addressing == AddrPlaceRelative {
		si.info.RelativeBaseAddr = 0
	}
	return si
}

func junk(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	// a zero-filled hole, as freed init memory reads
	clear(b[n/3 : n/3+min(n/3, 8192)])
	return b
}

func TestDecodeSyntheticLayouts(t *testing.T) {
	for i, l := range synthLayouts {
		t.Run(l.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 42))
			ptr := l.ptr
			if l.wide() {
				ptr = 8
			}
			syms := synthSymbols(rng, 1500+rng.IntN(300), l.addressing == AddrRelativeAbsolutePerCPU, ptr == 8, ptr)
			base := uint64(0xffffffff81000000)
			if ptr == 4 {
				base = 0xc1000000
			}
			si := encodeKallsyms(syms, l, base, junk(rng, 40000+rng.IntN(64)), junk(rng, 30000))
			tab, info, err := DecodeKallsymsInfo(si.img, base)
			if err != nil {
				t.Fatal(err)
			}
			if !equalSyms(tab.All(), syms) {
				got := tab.All()
				for j := range min(len(got), len(syms)) {
					if got[j] != syms[j] {
						t.Fatalf("%d symbols decoded (encoded %d); first difference at %d: %+v, want %+v", len(got), len(syms), j, got[j], syms[j])
					}
				}
				t.Fatalf("%d symbols decoded, encoded %d", len(got), len(syms))
			}
			if *info != si.info {
				t.Errorf("info:\n got %+v\nwant %+v", *info, si.info)
			}
			long := 0
			for _, s := range syms {
				if len(s.Name) > 200 {
					long++
				}
			}
			t.Logf("%d symbols (%d long, %d absolute), %d duplicates of a name", len(syms), long, info.NumAbsolute, len(syms)-distinctNames(syms))
		})
	}
}

func distinctNames(syms []Symbol) int {
	m := map[string]bool{}
	for _, s := range syms {
		m[s.Name] = true
	}
	return len(m)
}

// Without '0'..'9' among the characters there is no digit anchor: the full
// scan must find the table anyway.
func TestDecodeSyntheticWithoutDigits(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	syms := synthSymbols(rng, 700, true, false, 8)
	for i := range syms {
		syms[i].Name = strings.Map(func(r rune) rune {
			if r >= '0' && r <= '9' {
				return 'a' + (r - '0')
			}
			return r
		}, syms[i].Name)
	}
	l := synthLayout{"no-digits", true, AddrRelativeAbsolutePerCPU, 3, 8}
	si := encodeKallsyms(syms, l, 0xffffffff81000000, junk(rng, 5000), junk(rng, 5000))
	if bytes.Contains(si.img, digitTokens) {
		t.Fatalf("fixture still holds the digit tokens")
	}
	tab, err := DecodeKallsyms(si.img, si.base)
	if err != nil {
		t.Fatal(err)
	}
	if !equalSyms(tab.All(), syms) {
		t.Errorf("decoded table differs from the encoded one")
	}
}

// A damaged table must fail loudly, never decode into something else.
func TestDecodeSyntheticCorruptionFails(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	l := synthLayouts[6] // 6.3 with seqs, absolute per-CPU
	syms := synthSymbols(rng, 1200, true, true, 8)
	fresh := func() *synthImage {
		return encodeKallsyms(syms, l, 0xffffffff81000000, junk(rand.New(rand.NewPCG(1, 1)), 4096), junk(rand.New(rand.NewPCG(2, 2)), 4096))
	}
	cases := []struct {
		name   string
		damage func(si *synthImage)
	}{
		{"marker", func(si *synthImage) { si.img[si.markersOff+8]++ }},
		{"name length", func(si *synthImage) { si.img[si.namesOff+si.firstEntryAfter(300)]++ }},
		{"num_syms", func(si *synthImage) { binary.LittleEndian.PutUint32(si.img[si.namesOff-8:], uint32(len(syms)+300)) }},
		{"unsorted offsets", func(si *synthImage) {
			o := si.addrOff + 4*600
			a, b := slices.Clone(si.img[o:o+4]), slices.Clone(si.img[o+4:o+8])
			// swap two entries at different addresses
			for k := 0; binary.LittleEndian.Uint32(a) == binary.LittleEndian.Uint32(b); k++ {
				o += 4
				a, b = slices.Clone(si.img[o:o+4]), slices.Clone(si.img[o+4:o+8])
			}
			copy(si.img[o:], b)
			copy(si.img[o+4:], a)
		}},
		{"truncated", func(si *synthImage) { si.img = si.img[:si.markersOff+4] }},
	}
	if _, err := DecodeKallsyms(fresh().img, 0xffffffff81000000); err != nil {
		t.Fatalf("undamaged fixture does not decode: %v", err)
	}
	for _, c := range cases {
		si := fresh()
		c.damage(si)
		tab, err := DecodeKallsyms(si.img, si.base)
		if err == nil {
			t.Errorf("%s damaged: decoded %d symbols instead of failing", c.name, tab.Len())
			continue
		}
		t.Logf("%s damaged: %v", c.name, err)
	}
}

// firstEntryAfter returns the stream offset of the first names entry at or
// after byte off of the stream.
func (si *synthImage) firstEntryAfter(off int) int {
	pos := 0
	for pos < off {
		l := int(si.img[si.namesOff+pos])
		pos++
		if l&0x80 != 0 {
			l = l&0x7f | int(si.img[si.namesOff+pos])<<7
			pos++
		}
		pos += l
	}
	return pos
}

func TestDecodeGarbageFails(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	for _, size := range []int{0, 1, 511, 4096, 1 << 20} {
		_, err := DecodeKallsyms(junk(rng, size), 0xffffffff81000000)
		if err == nil {
			t.Errorf("%d bytes of junk decoded", size)
		} else if !strings.Contains(err.Error(), "kallsyms") {
			t.Errorf("error %q does not say what failed", err)
		}
	}
}
