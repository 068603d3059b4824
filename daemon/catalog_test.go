package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/patchsign"
)

const declaredOK = `id: kill
domains: ["web-*", "8a6d3f2e-0000-4000-8000-000000000001"]
match: {release: "6.1.*"}
edits:
  - {kind: return, function: version_proc_show, value: 0}
`

func TestParseDeclared(t *testing.T) {
	p, doms, err := ParseDeclared([]byte(declaredOK))
	if err != nil || p.ID != "kill" || len(doms) != 2 {
		t.Fatalf("%+v %v %v", p, doms, err)
	}
	d := &Declared{Domains: doms}
	for name, want := range map[string]bool{"web-1": true, "db-1": false, "8A6D3F2E-0000-4000-8000-000000000001": false} {
		if got := d.Selects(name, "x"); got != want {
			t.Errorf("Selects(%q) = %v", name, got)
		}
	}
	if !d.Selects("other", "8A6D3F2E-0000-4000-8000-000000000001") {
		t.Error("UUID selector (any case) not matched")
	}
	for _, bad := range []struct{ doc, want string }{
		{strings.Replace(declaredOK, "domains:", "domain:", 1), "domain"}, // unknown field
		{strings.Replace(declaredOK, `domains: ["web-*", "8a6d3f2e-0000-4000-8000-000000000001"]`+"\n", "", 1), "domains missing"},
		{strings.Replace(declaredOK, `"web-*"`, `"[web"`, 1), "not valid"},
		{declaredOK + "---\nid: x\n", "exactly one"},
		{strings.Replace(declaredOK, "value: 0", "value: 1000", 1), "edit"},
	} {
		if _, _, err := ParseDeclared([]byte(bad.doc)); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("want error with %q, got %v for\n%s", bad.want, err, bad.doc)
		}
	}
	// The API also takes plain patch files, with the CLI parser's messages.
	if _, doms, err := ParseForAPI([]byte(strings.Replace(declaredOK, `domains: ["web-*", "8a6d3f2e-0000-4000-8000-000000000001"]`+"\n", "", 1))); err != nil || doms != nil {
		t.Errorf("plain patch for the API: %v %v", doms, err)
	}
	if _, _, err := ParseForAPI([]byte("id: x\nbogus: 1\n")); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Errorf("unknown field through the API: %v", err)
	}
	// The patcher parses the domains field itself (and validates it).
	if p, err := patcher.ParsePatch([]byte(declaredOK)); err != nil || len(p.Domains) != 2 || p.Domains[0] != "web-*" {
		t.Errorf("patcher.ParsePatch of a declared file: %v %v", p, err)
	}
	if _, _, err := ParseDeclared([]byte(strings.Replace(declaredOK, `"web-*"`, `"web-["`, 1))); err == nil || !strings.Contains(err.Error(), "domains glob") {
		t.Errorf("bad domains glob: %v", err)
	}
}

func TestCatalogSignatures(t *testing.T) {
	dir, keys := t.TempDir(), t.TempDir()
	if _, _, err := patchsign.GenerateKey(keys, "k"); err != nil {
		t.Fatal(err)
	}
	priv, _ := patchsign.LoadPrivateKey(filepath.Join(keys, "k.key"))
	kr, err := patchsign.LoadKeyring(keys)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(s), 0o644)
		return p
	}
	signed := write("a.yaml", declaredOK)
	patchsign.SignFile(priv, signed)
	tampered := write("b.yaml", strings.Replace(declaredOK, "id: kill", "id: kill2", 1))
	patchsign.SignFile(priv, tampered)
	os.WriteFile(tampered, []byte(strings.Replace(declaredOK, "id: kill", "id: kill3", 1)), 0o644)
	write("c.yaml", strings.Replace(declaredOK, "id: kill", "id: unsigned", 1))
	write("d.yaml", declaredOK) // same id as a.yaml

	byFile := func(cat []*Declared) map[string]*Declared {
		m := map[string]*Declared{}
		for _, c := range cat {
			m[c.File] = c
		}
		return m
	}
	cat, err := loadCatalog(dir, kr, true)
	if err != nil {
		t.Fatal(err)
	}
	m := byFile(cat)
	if m["a.yaml"].Err != nil || m["a.yaml"].KeyID == "" {
		t.Errorf("signed file: %v", m["a.yaml"].Err)
	}
	if e := m["b.yaml"].Err; e == nil || !strings.Contains(e.Error(), "does not match") || !m["b.yaml"].Unsigned {
		t.Errorf("tampered file: %v", e)
	}
	if e := m["c.yaml"].Err; e == nil || !strings.Contains(e.Error(), "not signed") {
		t.Errorf("unsigned file with require_signed: %v", e)
	}
	// Without require_signed: unsigned files are used, a bad signature
	// still refuses, and a duplicate id is refused.
	m = byFile(must(loadCatalog(dir, kr, false)))
	if m["c.yaml"].Err != nil {
		t.Errorf("unsigned file without require_signed: %v", m["c.yaml"].Err)
	}
	if m["b.yaml"].Err == nil {
		t.Error("a bad signature was accepted because signatures are optional")
	}
	if e := m["d.yaml"].Err; e == nil || !strings.Contains(e.Error(), "already declared") {
		t.Errorf("duplicate id: %v", e)
	}
	if m["a.yaml"].Hash == m["d.yaml"].Hash {
		t.Error("a signed and an unsigned copy hash the same")
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestKernelMismatch(t *testing.T) {
	p := &patcher.Patch{ID: "p", Match: patcher.Match{Release: patcher.StringList{"6.1.*"}, BuildIDs: patcher.StringList{"abcd"}}}
	if why := kernelMismatch(p, "6.12.1", "abcd"); !strings.Contains(why, "6.12.1") {
		t.Errorf("release: %q", why)
	}
	if why := kernelMismatch(p, "6.1.0-56", "ef01"); !strings.Contains(why, "ef01") {
		t.Errorf("build id: %q", why)
	}
	if why := kernelMismatch(p, "6.1.0-56", "abcd"); why != "" {
		t.Errorf("match: %q", why)
	}
}
