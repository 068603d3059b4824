// Package patchsign signs and verifies hvpatch patch files with ed25519.
//
// A signature is a detached file next to the patch (FILE.sig). What is signed
// is not the raw file but a domain-separated digest of it, so a signature
// made for a patch can never be replayed as a signature over anything else:
//
//	message = "hvpatch patch signature v1\x00" || SHA-256(file bytes)
//
// Keys and signatures are PEM files, so they survive copy and paste:
// "HVPATCH ED25519 PRIVATE KEY" (the 32-byte seed), "HVPATCH ED25519 PUBLIC
// KEY" (32 bytes) and "HVPATCH SIGNATURE" (64 bytes, with a Key-Id header
// naming the public key that verifies it).
package patchsign

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const (
	privateKeyType = "HVPATCH ED25519 PRIVATE KEY"
	publicKeyType  = "HVPATCH ED25519 PUBLIC KEY"
	signatureType  = "HVPATCH SIGNATURE"
	messagePrefix  = "hvpatch patch signature v1\x00"
	// SignatureSuffix is appended to a patch file's path to name its signature.
	SignatureSuffix = ".sig"
)

// ErrUnsigned means a patch has no signature file.
var ErrUnsigned = errors.New("patch is not signed")

// KeyID names a public key: the first 8 bytes of its SHA-256, in hex.
func KeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:8])
}

func message(data []byte) []byte {
	sum := sha256.Sum256(data)
	return append([]byte(messagePrefix), sum[:]...)
}

// GenerateKey makes a new key pair and writes it as NAME.key (mode 0600) and
// NAME.pub in dir. Existing files are never overwritten.
func GenerateKey(dir, name string) (pubPath, privPath string, err error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	privPath = filepath.Join(dir, name+".key")
	pubPath = filepath.Join(dir, name+".pub")
	privPEM := pem.EncodeToMemory(&pem.Block{Type: privateKeyType, Headers: map[string]string{"Key-Id": KeyID(pub)}, Bytes: priv.Seed()})
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: publicKeyType, Headers: map[string]string{"Key-Id": KeyID(pub)}, Bytes: pub})
	if err := writeNew(privPath, privPEM, 0o600); err != nil {
		return "", "", err
	}
	if err := writeNew(pubPath, pubPEM, 0o644); err != nil {
		os.Remove(privPath)
		return "", "", err
	}
	return pubPath, privPath, nil
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func readPEM(path, wantType string) (*pem.Block, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, rest := pem.Decode(data)
	if block == nil || block.Type != wantType {
		return nil, fmt.Errorf("%s: not a %s file", path, strings.ToLower(wantType))
	}
	if strings.TrimSpace(string(rest)) != "" {
		return nil, fmt.Errorf("%s: unexpected data after the %s", path, strings.ToLower(wantType))
	}
	return block, nil
}

// LoadPrivateKey reads a NAME.key file written by GenerateKey.
func LoadPrivateKey(path string) (ed25519.PrivateKey, error) {
	block, err := readPEM(path, privateKeyType)
	if err != nil {
		return nil, err
	}
	if len(block.Bytes) != ed25519.SeedSize {
		return nil, fmt.Errorf("%s: private key seed is %d bytes, want %d", path, len(block.Bytes), ed25519.SeedSize)
	}
	return ed25519.NewKeyFromSeed(block.Bytes), nil
}

// LoadPublicKey reads a NAME.pub file written by GenerateKey.
func LoadPublicKey(path string) (ed25519.PublicKey, error) {
	block, err := readPEM(path, publicKeyType)
	if err != nil {
		return nil, err
	}
	if len(block.Bytes) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%s: public key is %d bytes, want %d", path, len(block.Bytes), ed25519.PublicKeySize)
	}
	return ed25519.PublicKey(block.Bytes), nil
}

// Sign returns the signature file contents for data.
func Sign(priv ed25519.PrivateKey, data []byte) []byte {
	sig := ed25519.Sign(priv, message(data))
	pub := priv.Public().(ed25519.PublicKey)
	return pem.EncodeToMemory(&pem.Block{Type: signatureType, Headers: map[string]string{"Key-Id": KeyID(pub)}, Bytes: sig})
}

// SignFile writes PATH.sig for the patch file at path.
func SignFile(priv ed25519.PrivateKey, path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sigPath := path + SignatureSuffix
	tmp := sigPath + ".tmp"
	if err := os.WriteFile(tmp, Sign(priv, data), 0o644); err != nil {
		return "", err
	}
	return sigPath, os.Rename(tmp, sigPath)
}

// Keyring is the set of public keys whose signatures are trusted.
type Keyring map[string]ed25519.PublicKey

// LoadKeyring reads public keys from files and directories (every *.pub in
// a directory).
func LoadKeyring(paths ...string) (Keyring, error) {
	kr := Keyring{}
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		files := []string{p}
		if st.IsDir() {
			files, _ = filepath.Glob(filepath.Join(p, "*.pub"))
			sort.Strings(files)
		}
		for _, f := range files {
			pub, err := LoadPublicKey(f)
			if err != nil {
				return nil, err
			}
			kr[KeyID(pub)] = pub
		}
	}
	return kr, nil
}

// Verify checks a signature file's contents against data and returns the
// id of the key that made it.
func (kr Keyring) Verify(data, sigFile []byte) (string, error) {
	block, rest := pem.Decode(sigFile)
	if block == nil || block.Type != signatureType || strings.TrimSpace(string(rest)) != "" {
		return "", errors.New("malformed signature file")
	}
	if len(block.Bytes) != ed25519.SignatureSize {
		return "", fmt.Errorf("signature is %d bytes, want %d", len(block.Bytes), ed25519.SignatureSize)
	}
	id := block.Headers["Key-Id"]
	pub, ok := kr[id]
	if !ok {
		return "", fmt.Errorf("signed by key %q, which is not trusted", id)
	}
	if !ed25519.Verify(pub, message(data), block.Bytes) {
		return "", fmt.Errorf("signature by key %s does not match the patch contents (tampered or re-edited)", id)
	}
	return id, nil
}

// VerifyFile checks the patch at path against path.sig and returns the patch
// bytes that were verified, so the caller parses exactly what was checked.
func (kr Keyring) VerifyFile(path string) ([]byte, string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	sig, err := os.ReadFile(path + SignatureSuffix)
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", fmt.Errorf("%s: %w (no %s%s)", path, ErrUnsigned, filepath.Base(path), SignatureSuffix)
	}
	if err != nil {
		return nil, "", err
	}
	id, err := kr.Verify(data, sig)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", path, err)
	}
	return data, id, nil
}
