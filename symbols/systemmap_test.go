package symbols

import (
	"bytes"
	"strings"
	"testing"
)

func TestSystemMapRoundTrip(t *testing.T) {
	tab := NewTable(smallTable())
	var b bytes.Buffer
	if err := tab.WriteKallsyms(&b); err != nil {
		t.Fatal(err)
	}
	back, err := LoadSystemMap(&b, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !equalSyms(back.All(), tab.All()) {
		t.Errorf("round trip differs:\n got %+v\nwant %+v", back.All(), tab.All())
	}
}

func TestSystemMapSlide(t *testing.T) {
	// As nm lists an x86-64 vmlinux: per-CPU symbols zero-based with type D.
	const m = `0000000000000000 D __per_cpu_start
0000000000000000 D fixed_percpu_data
0000000000001000 D cpu_debug_store
0000000000039000 D __per_cpu_end
0000000000000040 a some_absolute
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t helper
ffffffff82000000 R linux_banner
`
	const slide = 0x2a800000
	tab, err := LoadSystemMap(strings.NewReader(m), slide)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{
		"__per_cpu_start":   0,
		"fixed_percpu_data": 0,
		"cpu_debug_store":   0x1000,
		"__per_cpu_end":     0x39000,
		"some_absolute":     0x40,
		"_text":             0xffffffff81000000 + slide,
		"startup_64":        0xffffffff81000000 + slide,
		"helper":            0xffffffff81000100 + slide,
		"linux_banner":      0xffffffff82000000 + slide,
	}
	if tab.Len() != len(want) {
		t.Fatalf("%d symbols, want %d", tab.Len(), len(want))
	}
	for name, addr := range want {
		got, err := tab.Addr(name)
		if err != nil || got != addr {
			t.Errorf("%s = %#x (%v), want %#x", name, got, err, addr)
		}
	}
	if s := tab.Lookup("helper")[0]; s.Type != 't' {
		t.Errorf("helper type %q, want t", s.Type)
	}
}

func TestSystemMapErrors(t *testing.T) {
	cases := []struct{ name, in, want string }{
		// Debian's /boot/System.map-* placeholder.
		{"placeholder", "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n", "placeholder"},
		{"empty", "\n\n", "no symbols"},
		{"bad address", "zzzz T foo\n", `address "zzzz"`},
		{"short line", "ffffffff81000000 T\n", "line 1"},
		{"long type", "ffffffff81000000 TT foo\n", "line 1"},
		{"bad module", "ffffffff81000000 t foo e1000\n", "module column"},
	}
	for _, c := range cases {
		_, err := LoadSystemMap(strings.NewReader(c.in), 0)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one mentioning %q", c.name, err, c.want)
		}
	}
}
