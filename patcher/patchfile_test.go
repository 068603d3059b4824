package patcher

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func examplePatches(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("../configs/patches/*.yaml")
	if err != nil || len(files) < 2 {
		t.Fatalf("want the example patches in configs/patches, found %v (%v)", files, err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = b
	}
	return out
}

func TestExamplePatchesParse(t *testing.T) {
	kinds := map[string]bool{}
	for name, b := range examplePatches(t) {
		p, err := ParsePatch(b)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if p.ID+".yaml" != name {
			t.Errorf("%s: id %q does not match the file name", name, p.ID)
		}
		for _, e := range p.Edits {
			kinds[e.Kind] = true
		}
	}
	if !kinds[KindReturn] || !kinds[KindBytes] || !kinds[KindReplace] {
		t.Fatalf("the examples should show every edit kind, have %v", kinds)
	}
}

func TestParsePatchFields(t *testing.T) {
	p, err := ParsePatch([]byte(`
id: two-edits
description: d
match: {release: "6.1", build_id: "ABCDEF0123456789"}
edits:
  - {kind: return, function: f, value: -1}
  - {kind: return, function: g, void: true}
  - {kind: bytes, symbol: h, offset: 0x1a, expect: "74 0c", replace: "eb0c"}
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Match.Release; len(got) != 1 || got[0] != "6.1" {
		t.Errorf("release %q: a bare 6.1 must stay the text 6.1", got)
	}
	if got := p.Match.BuildIDs; len(got) != 1 || got[0] != "abcdef0123456789" {
		t.Errorf("build id %q, want it lower-cased", got)
	}
	if e := p.Edits[0]; *e.Value != -1 || e.Function != "f" {
		t.Errorf("edit 1 = %+v", e)
	}
	if e := p.Edits[1]; !e.Void || e.Value != nil {
		t.Errorf("edit 2 = %+v", e)
	}
	if e := p.Edits[2]; *e.Offset != 0x1a || string(e.Expect) != "\x74\x0c" || string(e.Replace) != "\xeb\x0c" {
		t.Errorf("edit 3 = %+v", e)
	}
}

func TestParsePatchRejects(t *testing.T) {
	const head = "id: x\nmatch: {release: \"6.*\"}\n"
	cases := []struct{ name, yaml, want string }{
		{"empty", "", "empty patch file"},
		{"unknown top field", head + "edits: [{kind: return, function: f, value: 0}]\nextra: 1\n", "field extra not found"},
		{"unknown edit field", head + "edits: [{kind: return, function: f, value: 0, colour: red}]\n", "field colour not found"},
		{"two documents", head + "edits: [{kind: return, function: f, value: 0}]\n---\nid: y\n", "exactly one YAML document"},
		{"bad id", "id: X Y\nmatch: {release: a}\nedits: [{kind: return, function: f, value: 0}]\n", "id \"X Y\""},
		{"no match", "id: x\nedits: [{kind: return, function: f, value: 0}]\n", "match needs"},
		{"bad glob", "id: x\nmatch: {release: \"6.[\"}\nedits: [{kind: return, function: f, value: 0}]\n", "release glob"},
		{"bad build id", "id: x\nmatch: {build_id: xyz}\nedits: [{kind: return, function: f, value: 0}]\n", "build_id \"xyz\""},
		{"no edits", head + "edits: []\n", "no edits"},
		{"no kind", head + "edits: [{function: f, value: 0}]\n", "kind missing"},
		{"bad kind", head + "edits: [{kind: jump, function: f}]\n", "unknown kind \"jump\""},
		{"return without value", head + "edits: [{kind: return, function: f}]\n", "exactly one of value"},
		{"return value and void", head + "edits: [{kind: return, function: f, value: 1, void: true}]\n", "exactly one of value"},
		{"return value too big", head + "edits: [{kind: return, function: f, value: 1000}]\n", "does not fit"},
		{"return with bytes fields", head + "edits: [{kind: return, function: f, value: 0, expect: \"90\"}]\n", "not symbol/offset"},
		{"return bad function", head + "edits: [{kind: return, function: \"f g\", value: 0}]\n", "not a symbol name"},
		{"bytes no offset", head + "edits: [{kind: bytes, symbol: s, expect: \"90\", replace: \"cc\"}]\n", "offset missing"},
		{"bytes lengths", head + "edits: [{kind: bytes, symbol: s, offset: 1, expect: \"90 90\", replace: \"cc\"}]\n", "same length"},
		{"bytes odd hex", head + "edits: [{kind: bytes, symbol: s, offset: 1, expect: \"909\", replace: \"ccc\"}]\n", "not a whole number of bytes"},
		{"bytes not hex", head + "edits: [{kind: bytes, symbol: s, offset: 1, expect: \"zz\", replace: \"cc\"}]\n", "invalid byte"},
		{"bytes unquoted hex", head + "edits: [{kind: bytes, symbol: s, offset: 1, expect: 90, replace: \"cc\"}]\n", "quoted hex"},
		{"bytes same", head + "edits: [{kind: bytes, symbol: s, offset: 1, expect: \"90\", replace: \"90\"}]\n", "changes nothing"},
		{"bytes too long", head + "edits: [{kind: bytes, symbol: s, offset: 1, expect: \"" + strings.Repeat("90", 65) + "\", replace: \"" + strings.Repeat("cc", 65) + "\"}]\n", "more than the 64"},
		{"bytes negative offset", head + "edits: [{kind: bytes, symbol: s, offset: -1, expect: \"90\", replace: \"cc\"}]\n", "cannot unmarshal !!int `-1` into uint64"},
		{"replace no object", head + "edits: [{kind: replace, function: f, with: g}]\n", "object"},
		{"replace no with", head + "edits: [{kind: replace, function: f, object: a.o}]\n", "with \"\" is not a symbol"},
		{"replace bad function", head + "edits: [{kind: replace, function: \"a b\", object: a.o, with: g}]\n", "not a symbol name"},
		{"replace with value", head + "edits: [{kind: replace, function: f, object: a.o, with: g, value: 0}]\n", "not symbol/offset"},
		{"object on return", head + "edits: [{kind: return, function: f, value: 0, object: a.o}]\n", "does not take object"},
		{"bad domains glob", head + "domains: [\"a[\"]\nedits: [{kind: return, function: f, value: 0}]\n", "domains glob"},
		{"empty domains glob", head + "domains: [\"\"]\nedits: [{kind: return, function: f, value: 0}]\n", "domains glob"},
		{"bytes with value", head + "edits: [{kind: bytes, symbol: s, offset: 1, value: 0, expect: \"90\", replace: \"cc\"}]\n", "not function/value"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParsePatch([]byte(c.yaml))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
}

// FuzzParsePatch: the parser must never panic, and whatever it accepts must
// satisfy the invariants the planner relies on.
func FuzzParsePatch(f *testing.F) {
	for _, b := range examplePatches(f) {
		f.Add(b)
	}
	f.Add([]byte("id: a\nmatch: {release: [\"*\"]}\nedits: [{kind: bytes, symbol: s, offset: 0, expect: \"00\", replace: \"01\"}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePatch(data)
		if err != nil {
			return
		}
		if p.ID == "" || len(p.Edits) == 0 {
			t.Fatalf("accepted a patch without id or edits: %+v", p)
		}
		for _, g := range p.Domains {
			if g == "" {
				t.Fatalf("accepted an empty domains glob: %+v", p.Domains)
			}
		}
		for _, e := range p.Edits {
			switch e.Kind {
			case KindBytes:
				if len(e.Expect) == 0 || len(e.Expect) != len(e.Replace) || e.Offset == nil {
					t.Fatalf("accepted a bad bytes edit: %+v", e)
				}
			case KindReturn:
				if e.Value == nil && !e.Void {
					t.Fatalf("accepted a return edit without value: %+v", e)
				}
			case KindReplace:
				if e.Object == "" || e.With == "" || e.Function == "" {
					t.Fatalf("accepted a replace edit without function, object or with: %+v", e)
				}
			default:
				t.Fatalf("accepted kind %q", e.Kind)
			}
		}
	})
}

func TestParseReplaceAndDomains(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "r.yaml")
	doc := "id: r\nmatch: {release: \"6.*\"}\ndomains: [\"web-*\", db]\nedits:\n  - {kind: replace, function: version_proc_show, object: sub/fix.o, with: my_show}\n"
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := LoadPatch(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Domains) != 2 || p.Domains[1] != "db" {
		t.Errorf("domains %q", p.Domains)
	}
	e := &p.Edits[0]
	if got, want := p.ObjectPath(e), filepath.Join(dir, "sub", "fix.o"); got != want {
		t.Errorf("object path %s, want %s (relative to the patch file)", got, want)
	}
	abs := *e
	abs.Object = "/abs/x.o"
	if got := p.ObjectPath(&abs); got != "/abs/x.o" {
		t.Errorf("absolute object path became %s", got)
	}
	if s := e.String(); !strings.Contains(s, "my_show") || !strings.Contains(s, "version_proc_show") {
		t.Errorf("String() = %q", s)
	}
}

func TestParseSymposAndObjects(t *testing.T) {
	sum := strings.Repeat("0f", 32)
	p, err := ParsePatch([]byte(`
id: cve-2026-1234
match: {build_id: "abcdef0123456789"}
objects: {fix.o: "` + strings.ToUpper(sum) + `"}
edits:
  - {kind: replace, function: pipe_write, object: fix.o, with: pipe_write}
  - {kind: replace, function: show_stat, sympos: 2, object: fix.o, with: show_stat}
  - {kind: return, function: f, sympos: 1, value: 0}
  - {kind: bytes, symbol: h, sympos: 3, offset: 0x1a, expect: "74 0c", replace: "eb 0c"}
`))
	if err != nil {
		t.Fatal(err)
	}
	if p.Objects["fix.o"] != sum {
		t.Errorf("objects %v: the hash should be lower-cased", p.Objects)
	}
	if p.Edits[0].Pos() != 0 || p.Edits[1].Pos() != 2 || p.Edits[2].Pos() != 1 || p.Edits[3].Pos() != 3 {
		t.Errorf("sympos %d %d %d %d", p.Edits[0].Pos(), p.Edits[1].Pos(), p.Edits[2].Pos(), p.Edits[3].Pos())
	}
	if s := p.Edits[1].String(); !strings.Contains(s, "show_stat (sympos 2)") {
		t.Errorf("edit text %q", s)
	}
	base := "id: x\nmatch: {release: \"*\"}\n"
	rep := "  - {kind: replace, function: f, object: fix.o, with: g}\n"
	bad := map[string]struct{ doc, want string }{
		"sympos 0":        {base + "edits:\n  - {kind: return, function: f, sympos: 0, value: 0}\n", "sympos 0"},
		"sympos negative": {base + "edits:\n  - {kind: return, function: f, sympos: -1, value: 0}\n", "sympos -1"},
		"sympos text":     {base + "edits:\n  - {kind: return, function: f, sympos: two, value: 0}\n", "cannot unmarshal"},
		"short hash":      {base + "objects: {fix.o: \"abcd\"}\nedits:\n" + rep, "not a SHA-256"},
		"not hex":         {base + "objects: {fix.o: \"" + strings.Repeat("zz", 32) + "\"}\nedits:\n" + rep, "not a SHA-256"},
		"unlisted object": {base + "objects: {other.o: \"" + sum + "\"}\nedits:\n" + rep, "fix.o is not listed in objects"},
		"unused object":   {base + "objects: {fix.o: \"" + sum + "\", other.o: \"" + sum + "\"}\nedits:\n" + rep, "other.o is listed but no replace edit uses it"},
		"objects no map":  {base + "objects: [fix.o]\nedits:\n" + rep, "cannot unmarshal !!seq"},
		"unknown key":     {base + "edits:\n  - {kind: replace, function: f, object: fix.o, with: g, sha256: x}\n", "sha256"},
	}
	for name, c := range bad {
		_, err := ParsePatch([]byte(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %q", name, err, c.want)
		}
	}
}
