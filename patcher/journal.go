package patcher

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Journal states of a patch.
const (
	StatePending   = "pending"   // about to be written into the guest
	StateApplied   = "applied"   // written and read back
	StateReverting = "reverting" // about to be restored
	// StateReleasing: the jumps of replace edits are gone, their code is
	// still in the code area (it was in use); a revert finishes it.
	StateReleasing = "releasing"
	// StateSuperseded: a cumulative patch (SupersededBy) replaced this
	// one in its stop and its code is released; the entry is history,
	// dropped when the superseding patch is reverted.
	StateSuperseded = "superseded"
	// StateModuleGone: the module the patch's edits are in was unloaded
	// (or unloaded and loaded again: its code is fresh). Nothing of the
	// patch is in that module any more; its replacement code, if any, is
	// released from the code area once nothing runs in it
	// (ReleaseModuleGone), and an apply puts the patch on the module
	// loaded now.
	StateModuleGone = "module gone"
)

// Journal is what hvpatch knows it has done to one domain. It lives in one
// JSON file per domain (named by UUID) in the state directory.
type Journal struct {
	Domain  string         `json:"domain"`
	UUID    string         `json:"uuid"`
	Patches []JournalPatch `json:"patches"`
}

// JournalPatch is one patch in the journal.
type JournalPatch struct {
	ID          string        `json:"id"`
	Description string        `json:"description,omitempty"`
	State       string        `json:"state"`
	Release     string        `json:"release"`
	BuildID     string        `json:"build_id,omitempty"`
	BootID      string        `json:"boot_id"`
	Time        time.Time     `json:"time"`
	Writer      string        `json:"writer,omitempty"`
	Freeze      time.Duration `json:"freeze_ns,omitempty"`
	Edits       []JournalEdit `json:"edits"`
	// Supersedes lists the patches this one replaced in its apply's stop
	// (replaces:); SupersededBy names the patch that replaced this one.
	Supersedes   []string `json:"supersedes,omitempty"`
	SupersededBy string   `json:"superseded_by,omitempty"`
	// Consistency is the patch file's consistency model; Tries the stops
	// its activeness check took (consistency: stack).
	Consistency string `json:"consistency,omitempty"`
	Tries       int    `json:"tries,omitempty"`
}

// JournalEdit is one edit with the bytes before and after it.
type JournalEdit struct {
	Kind   string  `json:"kind"`
	Symbol string  `json:"symbol"`
	Offset uint64  `json:"offset"`
	VA     uint64  `json:"va"`
	Old    hexJSON `json:"old"`
	New    hexJSON `json:"new"`
	Chunks []Chunk `json:"chunks"`
	// AreaEntry names the code-area entry a replace edit's jump leads
	// into: "<patch id>:<object file name>", shared by the patch's replace
	// edits of one object (journals of earlier versions hold the
	// replacement symbol, the name entries had then). Object is the file
	// it was linked from, ObjectSHA256 the hash of the bytes linked, With
	// the replacement function the jump leads to.
	AreaEntry    string `json:"area_entry,omitempty"`
	Object       string `json:"object,omitempty"`
	ObjectSHA256 string `json:"object_sha256,omitempty"`
	With         string `json:"with,omitempty"`
	// Module is the loaded module the edit is in ("" for the kernel
	// image), ModuleBase its text base at the apply: when the module
	// leaves the module list, or comes back at another base (or at the
	// same one with the original bytes at the site), the patch's state
	// becomes module gone.
	Module     string `json:"module,omitempty"`
	ModuleBase uint64 `json:"module_base,omitempty"`
}

type hexJSON []byte

func (h hexJSON) MarshalJSON() ([]byte, error) { return json.Marshal(FormatHex(h)) }
func (h *hexJSON) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := ParseHex(s)
	*h = v
	return err
}

func journalEdits(pl *Plan) []JournalEdit {
	out := make([]JournalEdit, len(pl.Edits))
	for i, e := range pl.Edits {
		out[i] = JournalEdit{Kind: e.Kind, Symbol: e.Symbol, Offset: e.Offset, VA: e.VA, Old: e.Old, New: e.New, Chunks: e.Chunks,
			Module: e.Module, ModuleBase: e.ModuleBase}
		if r := e.Replace; r != nil {
			out[i].AreaEntry, out[i].Object, out[i].ObjectSHA256, out[i].With = r.Entry, r.Object, r.SHA256, r.With
		}
	}
	return out
}

// Find returns the patch with that id, or nil.
func (j *Journal) Find(id string) *JournalPatch {
	for i := range j.Patches {
		if j.Patches[i].ID == id {
			return &j.Patches[i]
		}
	}
	return nil
}

// put adds or replaces a patch entry.
func (j *Journal) put(p JournalPatch) {
	if old := j.Find(p.ID); old != nil {
		*old = p
		return
	}
	j.Patches = append(j.Patches, p)
}

func (j *Journal) remove(id string) {
	for i := range j.Patches {
		if j.Patches[i].ID == id {
			j.Patches = append(j.Patches[:i], j.Patches[i+1:]...)
			return
		}
	}
}

// StateDir holds the journals and lock files of all domains. LockDir is
// where the host-wide per-domain locks are ("" is HostLockDir's default);
// every process patching this host's domains must use the same one.
type StateDir struct {
	Dir     string
	LockDir string
}

var uuidPattern = regexp.MustCompile(`^[0-9a-fA-F-]{1,64}$`)

func (s StateDir) journalPath(uuid string) (string, error) {
	if !uuidPattern.MatchString(uuid) {
		return "", fmt.Errorf("domain UUID %q is not a UUID", uuid)
	}
	return filepath.Join(s.Dir, uuid+".json"), nil
}

// Load reads a domain's journal; a domain never patched has an empty one.
func (s StateDir) Load(name, uuid string) (*Journal, error) {
	p, err := s.journalPath(uuid)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return &Journal{Domain: name, UUID: uuid}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal of domain %s: %w", name, err)
	}
	var j Journal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("journal of domain %s (%s) is corrupt: %w", name, p, err)
	}
	if j.UUID != uuid {
		return nil, fmt.Errorf("journal %s belongs to domain UUID %s, not %s", p, j.UUID, uuid)
	}
	j.Domain = name
	return &j, nil
}

// Save writes the journal atomically and durably: the parent directory is
// synced, the new content goes to a temporary file that is synced, renamed
// over the old one, and the directory is synced again so the rename itself
// survives a crash.
func (s StateDir) Save(j *Journal) error {
	p, err := s.journalPath(j.UUID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	if err := syncDir(s.Dir); err != nil {
		return err
	}
	f, err := os.CreateTemp(s.Dir, "."+j.UUID+".json.tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("writing journal of domain %s: %w", j.Domain, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing journal of domain %s: %w", j.Domain, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("replacing journal of domain %s: %w", j.Domain, err)
	}
	return syncDir(s.Dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing state directory %s: %w", dir, err)
	}
	return nil
}
