package daemon

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/patchsign"
)

// A declared patch file is a patch file (patcher's format) whose optional
// domains field (patcher.Patch.Domains) names the libvirt domains it is kept
// applied on: name globs or UUIDs. The daemon requires it, so that no file
// applies to every guest on a host by accident ("*" says so on purpose).
// The kernels a patch fits are its match section, as for the CLI.
//
//	id: version-kill-switch
//	domains: ["web-*", "db-1"]
//	match: {release: "6.1.*"}
//	edits: [...]

// Declared is one file of the patch directory, parsed and checked.
type Declared struct {
	File    string // base name in the patch directory
	Hash    string // of the file and its signature: a change means a new file
	Patch   *patcher.Patch
	Domains []string
	KeyID   string // the key that signed it, "" when unsigned
	// Err is why the file cannot be used (parse error, missing or bad
	// signature); such a file is reported, never applied.
	Err error
	// Unsigned is set when Err is a missing or bad signature.
	Unsigned bool
}

// Selects reports whether the file declares its patch for the domain.
func (d *Declared) Selects(name, uuid string) bool {
	for _, g := range d.Domains {
		if strings.EqualFold(g, uuid) {
			return true
		}
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// ParseDeclared parses a declared patch file strictly (as
// patcher.ParsePatch) and requires its domains selector.
func ParseDeclared(data []byte) (*patcher.Patch, []string, error) {
	p, err := patcher.ParsePatch(data)
	if err != nil {
		return nil, nil, err
	}
	if len(p.Domains) == 0 {
		return nil, nil, fmt.Errorf("patch %s: domains missing: name the domains it is for (globs, or \"*\" for all)", p.ID)
	}
	return p, p.Domains, nil
}

// ParseForAPI parses a patch sent to the API: a plain patch file or one
// with a domains selector.
func ParseForAPI(data []byte) (*patcher.Patch, []string, error) {
	p, doms, err := ParseDeclared(data)
	if err == nil {
		return p, doms, nil
	}
	p, perr := patcher.ParsePatch(data)
	if perr != nil {
		// The plain parser's message is the one the CLI gives for the same
		// file, unless the selector is what the file is about.
		if bytes.Contains(data, []byte("domains:")) {
			return nil, nil, err
		}
		return nil, nil, perr
	}
	return p, nil, nil
}

// loadCatalog reads every *.yaml file of dir. Signatures are checked when
// required or present: a file with a .sig that does not verify is refused
// even when unsigned files are accepted.
func loadCatalog(dir string, kr patchsign.Keyring, requireSigned bool) ([]*Declared, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, err
	}
	sort.Strings(files)
	var out []*Declared
	ids := map[string]string{}
	for _, f := range files {
		d := &Declared{File: filepath.Base(f)}
		out = append(out, d)
		raw, err := os.ReadFile(f)
		if err != nil {
			d.Err = err
			continue
		}
		sig, sigErr := os.ReadFile(f + patchsign.SignatureSuffix)
		sum := sha256.New()
		sum.Write(raw)
		sum.Write([]byte{0})
		sum.Write(sig)
		d.Hash = hex.EncodeToString(sum.Sum(nil)[:12])
		data := raw
		if requireSigned || sigErr == nil {
			data, d.KeyID, err = kr.VerifyFile(f)
			if err != nil {
				d.Err, d.Unsigned = fmt.Errorf("refused: %w", err), true
				continue
			}
		}
		d.Patch, d.Domains, d.Err = ParseDeclared(data)
		if d.Err != nil {
			d.Err = fmt.Errorf("patch file %s: %w", d.File, d.Err)
			continue
		}
		d.Patch.Dir = dir // replace edits name their objects relative to the file
		if requireSigned {
			if err := requirePinned(d.Patch); err != nil {
				d.Err, d.Unsigned = fmt.Errorf("patch file %s: %w", d.File, err), true
				continue
			}
		}
		if other, dup := ids[d.Patch.ID]; dup {
			d.Err = fmt.Errorf("patch file %s: id %s is already declared by %s", d.File, d.Patch.ID, other)
			continue
		}
		ids[d.Patch.ID] = d.File
	}
	return out, nil
}
