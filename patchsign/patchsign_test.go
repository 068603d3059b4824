package patchsign

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func setup(t *testing.T) (dir string, kr Keyring, patch string) {
	t.Helper()
	dir = t.TempDir()
	pubPath, privPath, err := GenerateKey(dir, "ops")
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(privPath); st.Mode().Perm() != 0o600 {
		t.Fatalf("private key mode %v", st.Mode().Perm())
	}
	priv, err := LoadPrivateKey(privPath)
	if err != nil {
		t.Fatal(err)
	}
	patch = filepath.Join(dir, "p.yaml")
	os.WriteFile(patch, []byte("id: demo\nedits: []\n"), 0o644)
	if _, err := SignFile(priv, patch); err != nil {
		t.Fatal(err)
	}
	kr, err = LoadKeyring(pubPath)
	if err != nil {
		t.Fatal(err)
	}
	return dir, kr, patch
}

func TestSignVerify(t *testing.T) {
	_, kr, patch := setup(t)
	data, id, err := kr.VerifyFile(patch)
	if err != nil {
		t.Fatal(err)
	}
	if string(data) != "id: demo\nedits: []\n" || len(id) != 16 {
		t.Fatalf("verified %q by %q", data, id)
	}
}

func TestTamperedPatchRefused(t *testing.T) {
	_, kr, patch := setup(t)
	os.WriteFile(patch, []byte("id: demo\nedits: [x]\n"), 0o644)
	if _, _, err := kr.VerifyFile(patch); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("tampered patch: %v", err)
	}
}

func TestUnsignedAndUntrusted(t *testing.T) {
	dir, kr, patch := setup(t)
	os.Remove(patch + SignatureSuffix)
	if _, _, err := kr.VerifyFile(patch); !errors.Is(err, ErrUnsigned) {
		t.Fatalf("unsigned: %v", err)
	}
	// A signature from a key that is not in the keyring.
	_, otherPriv, err := GenerateKey(dir, "stranger")
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := LoadPrivateKey(otherPriv)
	SignFile(priv, patch)
	if _, _, err := kr.VerifyFile(patch); err == nil || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("untrusted key: %v", err)
	}
	// A keyring from a directory trusts every key in it.
	all, err := LoadKeyring(dir)
	if err != nil || len(all) != 2 {
		t.Fatalf("keyring from dir: %d keys, %v", len(all), err)
	}
	if _, _, err := all.VerifyFile(patch); err != nil {
		t.Fatal(err)
	}
}

func TestMalformedSignature(t *testing.T) {
	_, kr, patch := setup(t)
	for _, bad := range []string{"", "garbage", "-----BEGIN HVPATCH SIGNATURE-----\nAAAA\n-----END HVPATCH SIGNATURE-----\n"} {
		os.WriteFile(patch+SignatureSuffix, []byte(bad), 0o644)
		if _, _, err := kr.VerifyFile(patch); err == nil {
			t.Fatalf("signature %q accepted", bad)
		}
	}
}

func TestGenerateKeyDoesNotOverwrite(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := GenerateKey(dir, "k"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := GenerateKey(dir, "k"); err == nil {
		t.Fatal("second GenerateKey overwrote the key")
	}
}
