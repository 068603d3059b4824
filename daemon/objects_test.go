package daemon

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/patchsign"
	"github.com/hvpatch/hvpatch/service"
)

// replacePatch is a patch with two replace edits sharing one object
// (pinned to pin when it is not empty) and one with another object.
func replacePatch(pin, pin2 string) string {
	s := "id: api-objects\nmatch: {release: \"6.1.*\"}\n"
	if pin != "" {
		s += "objects:\n  fix/a.o: " + pin + "\n  b.o: " + pin2 + "\n"
	}
	return s + `edits:
  - {kind: replace, function: version_proc_show, object: fix/a.o, with: new_version}
  - {kind: replace, function: cmdline_proc_show, object: fix/a.o, with: new_cmdline}
  - {kind: replace, function: meminfo_proc_show, object: b.o, with: new_meminfo}
`
}

func sum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// objectsDaemon is a daemon without libvirt whose one domain, "g", records
// what an apply staged for it and then fails to open ("no guest here").
type objectsDaemon struct {
	*Daemon
	srv    *httptest.Server
	staged map[string][]byte // object path relative to the staging dir -> bytes
	opened int
}

func newObjectsDaemon(t *testing.T, requireSigned bool, kr patchsign.Keyring) *objectsDaemon {
	od := &objectsDaemon{}
	hook := func(dom *domain, ctx context.Context, forPatch bool) error {
		od.opened++
		od.staged = map[string][]byte{}
		dirs, _ := filepath.Glob(filepath.Join(od.cfg.StateDir, ".objects-*"))
		for _, dir := range dirs {
			if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
				t.Errorf("staging directory %s: %v, want mode 0700", dir, fi.Mode())
			}
			filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Mode().IsRegular() {
					rel, _ := filepath.Rel(dir, p)
					od.staged[rel], _ = os.ReadFile(p)
				}
				return nil
			})
		}
		return errors.New("no guest here (test)")
	}
	d, _ := isolationDaemon(t, hook, "g")
	d.cfg.Signing.RequireSigned = requireSigned
	d.keyring = kr
	od.Daemon = d
	od.srv = httptest.NewServer(d.Handler())
	t.Cleanup(od.srv.Close)
	return od
}

func (od *objectsDaemon) apply(t *testing.T, req service.ApplyRequest) (int, string) {
	t.Helper()
	b, _ := json.Marshal(req)
	resp, err := http.Post(od.srv.URL+APIVersion+"/domains/g/apply", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e service.ErrorBody
	json.NewDecoder(resp.Body).Decode(&e)
	return resp.StatusCode, e.Error
}

// TestAPIApplyCarriesObjects: an apply through the API carries its
// objects; they are checked and staged in a private directory, never read
// from a path (in particular not from the daemon's working directory).
func TestAPIApplyCarriesObjects(t *testing.T) {
	a, b := []byte("\x7fELF object a"), []byte("\x7fELF object b")
	// A file with the object's name in the working directory must never
	// be what is used.
	wd := t.TempDir()
	t.Chdir(wd)
	os.MkdirAll("fix", 0o755)
	os.WriteFile("fix/a.o", []byte("from the daemon's working directory"), 0o644)
	os.WriteFile("b.o", []byte("from the daemon's working directory"), 0o644)

	od := newObjectsDaemon(t, false, nil)
	objs := map[string]string{"fix/a.o": b64(a), "b.o": b64(b)}
	for _, pinned := range []bool{false, true} {
		text := replacePatch("", "")
		if pinned {
			text = replacePatch(sum(a), sum(b))
		}
		od.opened = 0
		code, msg := od.apply(t, service.ApplyRequest{Patch: text, Objects: objs})
		if od.opened != 1 || !strings.Contains(msg, "no guest here") {
			t.Fatalf("pinned %v: apply answered %d %q, opened %d: want it to reach the domain", pinned, code, msg, od.opened)
		}
		if len(od.staged) != 2 || !bytes.Equal(od.staged[filepath.Join("fix", "a.o")], a) || !bytes.Equal(od.staged["b.o"], b) {
			t.Errorf("pinned %v: staged %q", pinned, od.staged)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(od.cfg.StateDir, ".objects-*")); len(left) != 0 {
		t.Errorf("staging directories left behind: %v", left)
	}

	bad := []struct {
		name string
		req  service.ApplyRequest
		code int
		want string
	}{
		{"no objects", service.ApplyRequest{Patch: replacePatch("", "")}, 400, "object fix/a.o is not in the request"},
		{"one missing", service.ApplyRequest{Patch: replacePatch("", ""), Objects: map[string]string{"fix/a.o": b64(a)}}, 400, "object b.o is not in the request"},
		{"unused object", service.ApplyRequest{Patch: replacePatch("", ""), Objects: map[string]string{"fix/a.o": b64(a), "b.o": b64(b), "c.o": b64(b)}}, 400, "c.o was sent but no replace edit"},
		{"not base64", service.ApplyRequest{Patch: replacePatch("", ""), Objects: map[string]string{"fix/a.o": "!!", "b.o": b64(b)}}, 400, "not base64"},
		{"swapped, unsigned", service.ApplyRequest{Patch: replacePatch(sum(a), sum(b)), Objects: map[string]string{"fix/a.o": b64(b), "b.o": b64(b)}}, 400, "SHA-256 is " + sum(b) + ", the patch file pins " + sum(a)},
		{"absolute path", service.ApplyRequest{Patch: strings.ReplaceAll(replacePatch("", ""), "fix/a.o", "/etc/a.o"), Objects: map[string]string{"/etc/a.o": b64(a), "b.o": b64(b)}}, 400, "relative to the patch file"},
		{"dot-dot path", service.ApplyRequest{Patch: strings.ReplaceAll(replacePatch("", ""), "fix/a.o", "../a.o"), Objects: map[string]string{"../a.o": b64(a), "b.o": b64(b)}}, 400, "no absolute path, no .."},
		{"objects without replace edits", service.ApplyRequest{Patch: versionKillSwitch(""), Objects: map[string]string{"b.o": b64(b)}}, 400, "no replace edit"},
		{"object too large", service.ApplyRequest{Patch: replacePatch("", ""), Objects: map[string]string{"fix/a.o": b64(make([]byte, MaxObjectBytes+1)), "b.o": b64(b)}}, 400, "more than the 8 MiB"},
		{"all objects too large", service.ApplyRequest{Patch: replacePatch("", "") + "  - {kind: replace, function: uptime_proc_show, object: c.o, with: new_uptime}\n",
			Objects: map[string]string{"fix/a.o": b64(make([]byte, 6<<20)), "b.o": b64(make([]byte, 6<<20)), "c.o": b64(make([]byte, 6<<20))}}, 400, "more than the 16 MiB an apply may carry"},
		{"body too large", service.ApplyRequest{Patch: replacePatch("", ""), Objects: map[string]string{"fix/a.o": strings.Repeat("A", maxApplyBody)}}, 413, "request body: more than"},
	}
	for _, c := range bad {
		od.opened = 0
		code, msg := od.apply(t, c.req)
		if code != c.code || !strings.Contains(msg, c.want) || od.opened != 0 {
			t.Errorf("%s: %d %q (domain opened %d times); want %d mentioning %q, before the domain is opened", c.name, code, msg, od.opened, c.code, c.want)
		}
	}
}

// TestAPISignedBundle: with require_signed, the signature covers the patch
// file and its pins cover the objects: a swapped object is refused (403)
// before the guest is touched; a patch linking unpinned objects is refused;
// the correctly signed bundle goes on to the domain.
func TestAPISignedBundle(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	kr := patchsign.Keyring{patchsign.KeyID(pub): pub}
	od := newObjectsDaemon(t, true, kr)
	a, b := []byte("\x7fELF object a"), []byte("\x7fELF object b")
	signed := replacePatch(sum(a), sum(b))
	sig := string(patchsign.Sign(priv, []byte(signed)))
	objs := map[string]string{"fix/a.o": b64(a), "b.o": b64(b)}

	code, msg := od.apply(t, service.ApplyRequest{Patch: signed, Signature: sig, Objects: map[string]string{"fix/a.o": b64(b), "b.o": b64(b)}})
	if code != http.StatusForbidden || !strings.Contains(msg, "object fix/a.o: refused") || od.opened != 0 {
		t.Errorf("swapped object: %d %q, opened %d; want 403 before the guest is opened", code, msg, od.opened)
	}
	unpinned := replacePatch("", "")
	code, msg = od.apply(t, service.ApplyRequest{Patch: unpinned, Signature: string(patchsign.Sign(priv, []byte(unpinned))), Objects: objs})
	if code != http.StatusForbidden || !strings.Contains(msg, "no objects: SHA-256 pins") || od.opened != 0 {
		t.Errorf("unpinned objects: %d %q; want 403", code, msg)
	}
	code, msg = od.apply(t, service.ApplyRequest{Patch: signed, Objects: objs})
	if code != http.StatusForbidden || !strings.Contains(msg, "not signed") {
		t.Errorf("unsigned: %d %q; want 403", code, msg)
	}
	code, msg = od.apply(t, service.ApplyRequest{Patch: signed, Signature: sig, Objects: objs})
	if od.opened != 1 || !strings.Contains(msg, "no guest here") {
		t.Errorf("signed bundle: %d %q; want it to reach the domain", code, msg)
	}
	if n := counterValue(t, od.metrics, "signature"); n != 3 {
		t.Errorf("signature failures %v, want 3", n)
	}
}

// TestCatalogRequiresPins: with require_signed, a declared patch whose
// replace objects are not pinned is refused like an unsigned one.
func TestCatalogRequiresPins(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	kr := patchsign.Keyring{patchsign.KeyID(pub): pub}
	dir := t.TempDir()
	for name, text := range map[string]string{
		"pinned.yaml":   strings.Replace(replacePatch(sum([]byte("a")), sum([]byte("b"))), "id: api-objects", "id: pinned\ndomains: [\"*\"]", 1),
		"unpinned.yaml": strings.Replace(replacePatch("", ""), "id: api-objects", "id: unpinned\ndomains: [\"*\"]", 1),
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(text), 0o644)
		if _, err := patchsign.SignFile(priv, p); err != nil {
			t.Fatal(err)
		}
	}
	cat, err := loadCatalog(dir, kr, true)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, c := range cat {
		got[c.File] = fmt.Sprint(c.Err)
	}
	if got["pinned.yaml"] != "<nil>" || !strings.Contains(got["unpinned.yaml"], "no objects: SHA-256 pins") {
		t.Errorf("catalog: %v", got)
	}
}
