package service

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestDomainsListedLikeVirshList(t *testing.T) {
	ds := Domains{
		{Name: "zeta", ID: -1, State: "shutoff"},
		{Name: "web02", ID: 7, State: "running"},
		{Name: "alpha", ID: -1, State: "shutoff"},
		{Name: "db", ID: 3, State: "paused"},
		{Name: "web01", ID: 12, State: "running"},
	}
	names := func(ds Domains) string {
		var n []string
		for _, d := range ds {
			n = append(n, d.Name)
		}
		return strings.Join(n, " ")
	}
	if got := names(ds.Listed(false)); got != "db web02 web01" {
		t.Errorf("active: %q", got)
	}
	if got := names(ds.Listed(true)); got != "db web02 web01 alpha zeta" {
		t.Errorf("--all: %q", got)
	}
	if got := (Domains{{Name: "x", ID: -1}}).Listed(false); got == nil || len(got) != 0 {
		t.Errorf("none active: %#v, want an empty list (JSON [])", got)
	}
}

func TestAbsentTimesOmitted(t *testing.T) {
	st := Status{Domain: "d", Patches: []PatchStatus{{ID: "p"}}, Declared: []Declared{{File: "f", ID: "p"}}}
	b, _ := json.Marshal(st)
	if strings.Contains(string(b), "0001-01-01") || strings.Contains(string(b), `"time"`) || strings.Contains(string(b), `"since"`) {
		t.Errorf("zero times printed: %s", b)
	}
	var sb strings.Builder
	st.WriteText(&sb)
	if strings.Contains(sb.String(), "0001-01-01") {
		t.Errorf("zero time in text: %s", sb.String())
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	st.Patches[0].Time = at
	b, _ = json.Marshal(st)
	if !strings.Contains(string(b), `"time":"2026-01-02T03:04:05Z"`) {
		t.Errorf("set time not printed: %s", b)
	}
}

func TestParseAddr(t *testing.T) {
	for _, c := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"0", 0, true}, {"16", 16, true}, {"0x10", 16, true}, {"0xffff_ffff_8100_0000", 0xffffffff81000000, true},
		{"ffffffff81000000", 0xffffffff81000000, true}, {"version_proc_show", 0, false}, {"", 0, false}, {"0x", 0, false},
	} {
		got, ok := ParseAddr(nil, c.in)
		if got != c.want || ok != c.ok {
			t.Errorf("ParseAddr(%q) = %#x, %v; want %#x, %v", c.in, got, ok, c.want, c.ok)
		}
	}
}

func TestListingText(t *testing.T) {
	l := Listing{Insts: []Inst{
		{Addr: "0xffffffff8134c2a0", Where: "version_proc_show+0x0", Bytes: "55", Text: "push %rbp"},
		{Addr: "0xffffffff8134c2a1", Where: "version_proc_show+0x1", Bytes: "e8fa000000", Text: "call 0xffffffff8134c3a0 <seq_printf>"},
		{Addr: "0xffffffff8134c2a6", Where: "version_proc_show+0x6", Bytes: "c3", Text: "ret"},
	}}
	var b strings.Builder
	l.WriteText(&b)
	for _, w := range []string{"<version_proc_show+0x0>:", "push   %rbp", "call   0xffffffff8134c3a0 <seq_printf>", "ret\n"} {
		if !strings.Contains(b.String(), w) {
			t.Errorf("listing lacks %q:\n%s", w, b.String())
		}
	}
	sl := SymLookup{Query: "x", Symbols: []SymbolInfo{{Name: "x", Addr: "0x10", Type: "T", GapToNext: 0x40, Aliases: []string{"y"}}}}
	b.Reset()
	sl.WriteText(&b)
	if got := b.String(); got != "0000000000000010 T x (next symbol 0x40 bytes on; aliases: y)\n" {
		t.Errorf("sym text %q", got)
	}
}
