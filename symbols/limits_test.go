package symbols

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"
)

// fakeTokenTable is something shaped like kallsyms_token_table followed by
// kallsyms_token_index, as a guest can plant any number of times: 256
// printable tokens, the first ten the digits.
func fakeTokenTable(seed byte) []byte {
	var table []byte
	var index [256]uint16
	for i := 0; i < 256; i++ {
		index[i] = uint16(len(table))
		if i < 10 {
			table = append(table, '0'+byte(i))
		} else {
			table = append(table, 'a'+byte(i%26), 'a'+byte((i/26+int(seed))%26))
		}
		table = append(table, 0)
	}
	for len(table)%8 != 0 {
		table = append(table, 0)
	}
	for _, v := range index {
		table = binary.LittleEndian.AppendUint16(table, v)
	}
	return table
}

// Planting many fake token tables after 32 MiB of zeros made one decode
// take minutes (each candidate searched 32 MiB back, and there was no limit
// on candidates); now the search stops at its budget with an error naming
// it.
func TestDecodeBoundedOnPlantedTokenTables(t *testing.T) {
	img := make([]byte, 33<<20)
	for i := 0; i < 300; i++ {
		img = append(img, fakeTokenTable(byte(i))...)
		img = append(img, make([]byte, 64)...)
	}
	t0 := time.Now()
	_, _, err := DecodeKallsymsInfo(img, 0xffffffff81000000)
	if err == nil || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("decode error = %v, want one naming the search limit", err)
	}
	// A generous safety bound only: unbounded, this took minutes.
	if d := time.Since(t0); d > 30*time.Second {
		t.Errorf("decode took %v", d)
	}
	t.Logf("%v in %v", err, time.Since(t0))
}

// 200,000 symbols at one address made Resolve, called once per
// instruction by read --disasm, walk back over all of them each time.
func TestResolveManyAtOneAddress(t *testing.T) {
	const n = 200_000
	syms := make([]Symbol, 0, n+2)
	syms = append(syms, Symbol{Name: "before", Addr: 0x1000, Type: 'T'})
	for i := 0; i < n; i++ {
		syms = append(syms, Symbol{Name: "dup", Addr: 0x2000, Type: 'd'})
	}
	syms = append(syms, Symbol{Name: "after", Addr: 0x3000, Type: 'T'})
	syms[1].Name = "first"
	tab := NewTable(syms)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		s, off, ok := tab.Resolve(0x2000 + uint64(i%0x1000))
		if !ok || s.Name != "first" || off != uint64(i%0x1000) {
			t.Fatalf("Resolve = %+v %#x %v", s, off, ok)
		}
		if sz := tab.FunctionSize(s); sz != 0x1000 {
			t.Fatalf("FunctionSize = %#x", sz)
		}
	}
	// Quadratic, this is 2*10^10 steps; a generous safety bound only.
	if d := time.Since(t0); d > 10*time.Second {
		t.Errorf("%d resolutions took %v", n, d)
	}
}
