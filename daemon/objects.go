package daemon

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/hvpatch/hvpatch/patcher"
)

// An apply through the API carries the patch file and the objects its
// replace edits link (ApplyRequest.Objects: the object path as the edits
// write it -> the file's bytes in base64). Nothing of an API patch is read
// from a path on the daemon's side: the objects are checked (named
// relative to the patch file, sizes bounded, the patch's objects: SHA-256
// pins matched) and written into a private directory for the patcher,
// which checks the pins again before linking. With signing.require_signed
// every replace object must be pinned: the signature covers the patch
// file, the pins cover the code.

// Bounds of the objects an apply may carry (decoded sizes).
const (
	MaxObjectBytes  = 8 << 20
	MaxObjectsBytes = 16 << 20
	// maxApplyBody bounds an apply request: the patch file and signature
	// (4 MiB, as every other body) plus the objects in base64.
	maxApplyBody = 4<<20 + (MaxObjectsBytes+2)/3*4 + 64<<10
)

// replaceObjects lists the distinct objects the patch's replace edits name.
func replaceObjects(p *patcher.Patch) []string {
	seen := map[string]bool{}
	var out []string
	for _, e := range p.Edits {
		if e.Kind == patcher.KindReplace && !seen[e.Object] {
			seen[e.Object] = true
			out = append(out, e.Object)
		}
	}
	return out
}

// requirePinned refuses a patch whose replace objects are not pinned by
// SHA-256 in the patch file: a signature over the file would not cover
// the code it links.
func requirePinned(p *patcher.Patch) error {
	objs := replaceObjects(p)
	if len(objs) == 0 || p.Objects != nil {
		return nil // ParsePatch requires every replace object in objects: when it is given
	}
	return fmt.Errorf("patch %s: refused: it links %v but its patch file has no objects: SHA-256 pins, so a signature does not cover that code, and hvpatchd requires signed patches (hvpatch build writes the pins)", p.ID, objs)
}

// objectError is an object refused: a pin mismatch is forbidden when the
// patch was signed (the code is not what was signed), a bad request
// otherwise.
type objectError struct {
	mismatch bool
	error
}

// checkObjects decodes and checks the objects sent with an API apply of
// p: every replace object is there, named relative to the patch file,
// within the size bounds, and matches its pin; nothing else is sent.
func checkObjects(p *patcher.Patch, sent map[string]string) (map[string][]byte, error) {
	want := replaceObjects(p)
	if len(want) == 0 && len(sent) == 0 {
		return nil, nil
	}
	used := map[string]bool{}
	for _, o := range want {
		used[o] = true
	}
	names := make([]string, 0, len(sent))
	for name := range sent {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !used[name] {
			return nil, &objectError{false, fmt.Errorf("object %s was sent but no replace edit of patch %s uses it", name, p.ID)}
		}
	}
	out := map[string][]byte{}
	total := 0
	for _, name := range want {
		if !filepath.IsLocal(name) {
			return nil, &objectError{false, fmt.Errorf("patch %s: object %s: an apply through hvpatchd carries its objects, named relative to the patch file (no absolute path, no ..); hvpatchd never reads a path of the request", p.ID, name)}
		}
		enc, ok := sent[name]
		if !ok {
			return nil, &objectError{false, fmt.Errorf("patch %s: object %s is not in the request: an apply through hvpatchd carries every object its replace edits link (hvpatch apply sends them)", p.ID, name)}
		}
		if base64.StdEncoding.DecodedLen(len(enc)) > MaxObjectBytes+3 {
			return nil, &objectError{false, fmt.Errorf("patch %s: object %s is larger than the %d MiB an object may be", p.ID, name, MaxObjectBytes>>20)}
		}
		data, err := base64.StdEncoding.DecodeString(enc)
		if err != nil {
			return nil, &objectError{false, fmt.Errorf("patch %s: object %s: not base64: %w", p.ID, name, err)}
		}
		if len(data) > MaxObjectBytes {
			return nil, &objectError{false, fmt.Errorf("patch %s: object %s is %d bytes, more than the %d MiB an object may be", p.ID, name, len(data), MaxObjectBytes>>20)}
		}
		if total += len(data); total > MaxObjectsBytes {
			return nil, &objectError{false, fmt.Errorf("patch %s: the objects are more than the %d MiB an apply may carry", p.ID, MaxObjectsBytes>>20)}
		}
		if pin, ok := p.Objects[name]; ok {
			sum := sha256.Sum256(data)
			if got := hex.EncodeToString(sum[:]); got != pin {
				return nil, &objectError{true, fmt.Errorf("patch %s: object %s: refused: its SHA-256 is %s, the patch file pins %s (the object is not the one the patch was made and signed with)", p.ID, name, got, pin)}
			}
		}
		out[name] = data
	}
	return out, nil
}

// stageObjects writes checked objects into a new private directory under
// the state directory and points the patch at it. The caller removes the
// directory when the operation is over.
func stageObjects(stateDir string, p *patcher.Patch, objs map[string][]byte) (string, error) {
	dir, err := os.MkdirTemp(stateDir, ".objects-")
	if err != nil {
		return "", err
	}
	for name, data := range objs {
		path := filepath.Join(dir, filepath.Clean(name))
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			os.RemoveAll(dir)
			return "", err
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			os.RemoveAll(dir)
			return "", err
		}
	}
	p.Dir = dir
	return dir, nil
}
