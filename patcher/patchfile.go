package patcher

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// Patch is one patch file: what to change, and on which kernels.
type Patch struct {
	ID          string `yaml:"id"`
	Description string `yaml:"description"`
	Match       Match  `yaml:"match"`
	// Domains optionally names the libvirt domains the patch is declared
	// for (name globs or UUIDs); the daemon keeps it applied on them.
	Domains StringList `yaml:"domains,omitempty"`
	// Objects optionally pins the replace edits' objects: object path (as
	// the edits write it) -> SHA-256 of its bytes, in hex. When present,
	// every replace edit's object must be listed, and an object whose
	// bytes hash to anything else is refused before it is linked, so a
	// signature over the patch file covers the code too.
	Objects map[string]string `yaml:"objects,omitempty"`
	// Consistency is how the apply makes sure no task is in the middle of
	// a function it changes: "none" (or empty: the default for hand-written
	// patches) writes at once; "stack" (what hvpatch build writes) refuses
	// to switch, inside the stop, while any vCPU executes a function being
	// replaced or any kernel stack returns into one, and retries (see
	// ConsistencyStack).
	Consistency string `yaml:"consistency,omitempty"`
	// Replaces lists patches this one supersedes (a cumulative patch):
	// the apply swaps their edits for its own in one stop and releases
	// their code once nothing uses it.
	Replaces StringList `yaml:"replaces,omitempty"`
	Edits    []Edit     `yaml:"edits"`

	// Dir is the directory relative paths of the patch (replace objects)
	// are taken from: the patch file's own directory for LoadPatch, the
	// current directory when empty.
	Dir string `yaml:"-"`
}

// Consistency models of a patch file.
const (
	ConsistencyNone  = "none"
	ConsistencyStack = "stack"
)

// StackConsistency reports whether the apply must check the changed
// functions are inactive (consistency: stack).
func (p *Patch) StackConsistency() bool { return p.Consistency == ConsistencyStack }

// Supersedes reports whether the patch lists id in replaces.
func (p *Patch) Supersedes(id string) bool {
	for _, r := range p.Replaces {
		if r == id {
			return true
		}
	}
	return false
}

// Match says which guest kernels a patch is meant for. A kernel matches when
// its release matches one of the Release globs (if any are given) and its
// GNU build id equals one of BuildIDs (if any are given).
type Match struct {
	Release  StringList `yaml:"release"`
	BuildIDs StringList `yaml:"build_id"`
}

// Edit kinds.
const (
	KindReturn  = "return"
	KindBytes   = "bytes"
	KindReplace = "replace"
)

// Edit is one change of a patch.
type Edit struct {
	Kind string `yaml:"kind"`

	// return: Function returns Value (or nothing, when Void) at once.
	Function string `yaml:"function,omitempty"`
	Value    *int64 `yaml:"value,omitempty"`
	Void     bool   `yaml:"void,omitempty"`

	// bytes: at Symbol+Offset, Expect is replaced by Replace.
	Symbol  string   `yaml:"symbol,omitempty"`
	Offset  *uint64  `yaml:"offset,omitempty"`
	Expect  HexBytes `yaml:"expect,omitempty"`
	Replace HexBytes `yaml:"replace,omitempty"`

	// replace: Function's entry jumps to the symbol With of the ELF
	// relocatable Object (a path relative to the patch file's directory).
	Object string `yaml:"object,omitempty"`
	With   string `yaml:"with,omitempty"`

	// Sympos (return, bytes, replace) picks the N-th (1-based, in kallsyms
	// address order) of several guest symbols of the same name (static
	// functions of different files). Without it such a name is an error.
	Sympos *int `yaml:"sympos,omitempty"`

	// Module (return, bytes, replace) says the function or symbol is one
	// of that loaded module's (its name as /proc/modules shows it, e.g.
	// nf_tables), read from the module's own symbol table; without it the
	// name is the kernel image's.
	Module string `yaml:"module,omitempty"`
}

// Name is the function (return, replace) or symbol (bytes) the edit is at.
func (e *Edit) Name() string {
	if e.Kind == KindBytes {
		return e.Symbol
	}
	return e.Function
}

// Pos is the edit's sympos, 0 when none was given.
func (e *Edit) Pos() int {
	if e.Sympos == nil {
		return 0
	}
	return *e.Sympos
}

// ObjectPath is the file a replace edit's object is read from.
func (p *Patch) ObjectPath(e *Edit) string {
	if filepath.IsAbs(e.Object) || p.Dir == "" {
		return e.Object
	}
	return filepath.Join(p.Dir, e.Object)
}

// MaxEditBytes bounds a bytes edit: longer rewrites are function
// replacements, not byte edits.
const MaxEditBytes = 64

// HexBytes is a byte string written in hex in the patch file ("74 0c" or
// "740c").
type HexBytes []byte

func (h *HexBytes) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!str" {
		return fmt.Errorf("line %d: want a quoted hex byte string like \"74 0c\"", n.Line)
	}
	b, err := ParseHex(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*h = b
	return nil
}

func (h HexBytes) MarshalYAML() (any, error) { return FormatHex(h), nil }

// ParseHex reads hex bytes, optionally separated by spaces.
func ParseHex(s string) ([]byte, error) {
	compact := strings.Join(strings.Fields(s), "")
	if compact == "" {
		return nil, fmt.Errorf("empty hex byte string")
	}
	for _, f := range strings.Fields(s) {
		if len(f)%2 != 0 {
			return nil, fmt.Errorf("hex byte string %q: %q is not a whole number of bytes", s, f)
		}
	}
	b, err := hex.DecodeString(compact)
	if err != nil {
		return nil, fmt.Errorf("hex byte string %q: %w", s, err)
	}
	return b, nil
}

// FormatHex writes bytes as "74 0c".
func FormatHex(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return fmt.Sprintf("% x", b)
}

// StringList is one string or a list of strings in the patch file.
type StringList []string

func (l *StringList) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		if !textScalar(n) {
			return fmt.Errorf("line %d: want a string, got %s", n.Line, n.Tag)
		}
		*l = StringList{n.Value}
		return nil
	case yaml.SequenceNode:
		out := make(StringList, 0, len(n.Content))
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode || !textScalar(c) {
				return fmt.Errorf("line %d: want a string", c.Line)
			}
			out = append(out, c.Value)
		}
		*l = out
		return nil
	}
	return fmt.Errorf("line %d: want a string or a list of strings", n.Line)
}

// textScalar accepts scalars YAML would read as numbers too: a release
// "6.1" or an all-digit build id is meant as the text written.
func textScalar(n *yaml.Node) bool {
	return n.Tag == "!!str" || n.Tag == "!!int" || n.Tag == "!!float"
}

var (
	idPattern     = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	symbolPattern = regexp.MustCompile(`^[A-Za-z_.$][A-Za-z0-9_.$]{0,127}$`)
	buildIDHex    = regexp.MustCompile(`^[0-9a-f]{8,128}$`)
	sha256Hex     = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// LoadPatch reads and validates a patch file.
func LoadPatch(file string) (*Patch, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	p, err := ParsePatch(data)
	if err != nil {
		return nil, fmt.Errorf("patch file %s: %w", file, err)
	}
	p.Dir = filepath.Dir(file)
	return p, nil
}

// ParsePatch parses and validates one patch document. It is strict: unknown
// fields, a second document, malformed hex and inconsistent edits are errors.
func ParsePatch(data []byte) (*Patch, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var p Patch
	if err := dec.Decode(&p); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("empty patch file")
		}
		return nil, err
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("a patch file holds exactly one YAML document")
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// Validate checks a patch for everything that does not need the guest. It
// also lower-cases build ids, the form BuildID returns.
func (p *Patch) Validate() error {
	if !idPattern.MatchString(p.ID) {
		return fmt.Errorf("id %q: want 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit", p.ID)
	}
	if len(p.Match.Release) == 0 && len(p.Match.BuildIDs) == 0 {
		return fmt.Errorf("patch %s: match needs a release glob or a build_id", p.ID)
	}
	for _, g := range p.Match.Release {
		if g == "" {
			return fmt.Errorf("patch %s: empty release glob", p.ID)
		}
		if _, err := path.Match(g, ""); err != nil {
			return fmt.Errorf("patch %s: release glob %q: %w", p.ID, g, err)
		}
	}
	for i, id := range p.Match.BuildIDs {
		norm := strings.ToLower(id)
		if !buildIDHex.MatchString(norm) || len(norm)%2 != 0 {
			return fmt.Errorf("patch %s: build_id %q: want hex digits (as readelf -n prints them)", p.ID, id)
		}
		p.Match.BuildIDs[i] = norm
	}
	for _, g := range p.Domains {
		if _, err := path.Match(g, ""); err != nil || g == "" {
			return fmt.Errorf("patch %s: domains glob %q is not valid", p.ID, g)
		}
	}
	switch p.Consistency {
	case "", ConsistencyNone, ConsistencyStack:
	default:
		return fmt.Errorf("patch %s: consistency %q: want none or stack", p.ID, p.Consistency)
	}
	seen := map[string]bool{}
	for _, r := range p.Replaces {
		switch {
		case !idPattern.MatchString(r):
			return fmt.Errorf("patch %s: replaces: %q is not a patch id", p.ID, r)
		case r == p.ID:
			return fmt.Errorf("patch %s: replaces itself", p.ID)
		case seen[r]:
			return fmt.Errorf("patch %s: replaces lists %s twice", p.ID, r)
		}
		seen[r] = true
	}
	if len(p.Edits) == 0 {
		return fmt.Errorf("patch %s: no edits", p.ID)
	}
	for i := range p.Edits {
		if err := p.Edits[i].validate(); err != nil {
			return fmt.Errorf("patch %s: edit %d: %w", p.ID, i+1, err)
		}
	}
	return p.validateObjects()
}

// validateObjects checks the objects map: SHA-256 hex values (lower-cased),
// every replace edit's object listed, nothing listed that no edit uses.
func (p *Patch) validateObjects() error {
	if p.Objects == nil {
		return nil
	}
	used := map[string]bool{}
	for i, e := range p.Edits {
		if e.Kind != KindReplace {
			continue
		}
		if _, ok := p.Objects[e.Object]; !ok {
			return fmt.Errorf("patch %s: edit %d: object %s is not listed in objects (when objects is given, it must pin every replace edit's object)", p.ID, i+1, e.Object)
		}
		used[e.Object] = true
	}
	names := make([]string, 0, len(p.Objects))
	for name := range p.Objects {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		norm := strings.ToLower(p.Objects[name])
		if name == "" || strings.ContainsRune(name, 0) {
			return fmt.Errorf("patch %s: objects: empty or invalid object path %q", p.ID, name)
		}
		if !sha256Hex.MatchString(norm) {
			return fmt.Errorf("patch %s: objects: %s: %q is not a SHA-256 in hex (64 hex digits, as sha256sum prints it)", p.ID, name, p.Objects[name])
		}
		if !used[name] {
			return fmt.Errorf("patch %s: objects: %s is listed but no replace edit uses it", p.ID, name)
		}
		p.Objects[name] = norm
	}
	return nil
}

// moduleName is a loaded module's name (MODULE_NAME_LEN is 56 with the NUL).
var moduleName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,55}$`)

func (e *Edit) validate() error {
	if e.Sympos != nil && *e.Sympos < 1 {
		return fmt.Errorf("sympos %d: want 1 or more (the N-th symbol of that name in kallsyms order)", *e.Sympos)
	}
	if e.Module != "" && !moduleName.MatchString(e.Module) {
		return fmt.Errorf("module %q: want a module name as /proc/modules shows it (1-55 characters of a-z A-Z 0-9 _ -)", e.Module)
	}
	if e.Kind != KindReplace && (e.Object != "" || e.With != "") {
		return fmt.Errorf("kind %s does not take object/with (those are for kind replace)", e.Kind)
	}
	switch e.Kind {
	case KindReplace:
		if e.Symbol != "" || e.Offset != nil || e.Expect != nil || e.Replace != nil || e.Value != nil || e.Void {
			return fmt.Errorf("kind replace takes function, object and with, not symbol/offset/expect/replace/value/void")
		}
		if !symbolPattern.MatchString(e.Function) {
			return fmt.Errorf("kind replace: function %q is not a symbol name", e.Function)
		}
		if e.Object == "" || strings.ContainsRune(e.Object, 0) {
			return fmt.Errorf("kind replace: object (the path of an ELF relocatable .o) missing")
		}
		if !symbolPattern.MatchString(e.With) {
			return fmt.Errorf("kind replace: with %q is not a symbol name (the replacement function in the object)", e.With)
		}
	case KindReturn:
		if e.Symbol != "" || e.Offset != nil || e.Expect != nil || e.Replace != nil {
			return fmt.Errorf("kind return takes function and value (or void), not symbol/offset/expect/replace")
		}
		if !symbolPattern.MatchString(e.Function) {
			return fmt.Errorf("kind return: function %q is not a symbol name", e.Function)
		}
		if (e.Value == nil) == !e.Void {
			return fmt.Errorf("kind return: give exactly one of value: N or void: true")
		}
		if e.Value != nil {
			if _, err := ReturnSequence(*e.Value, false); err != nil {
				return fmt.Errorf("function %s: %w", e.Function, err)
			}
		}
	case KindBytes:
		if e.Function != "" || e.Value != nil || e.Void {
			return fmt.Errorf("kind bytes takes symbol, offset, expect and replace, not function/value/void")
		}
		if !symbolPattern.MatchString(e.Symbol) {
			return fmt.Errorf("kind bytes: symbol %q is not a symbol name", e.Symbol)
		}
		if e.Offset == nil {
			return fmt.Errorf("kind bytes: offset missing")
		}
		if *e.Offset > 1<<20 {
			return fmt.Errorf("kind bytes: offset %#x is beyond any function", *e.Offset)
		}
		if len(e.Expect) == 0 || len(e.Replace) == 0 {
			return fmt.Errorf("kind bytes: expect and replace are both required")
		}
		if len(e.Expect) != len(e.Replace) {
			return fmt.Errorf("kind bytes: expect has %d bytes, replace %d: they must be the same length", len(e.Expect), len(e.Replace))
		}
		if len(e.Expect) > MaxEditBytes {
			return fmt.Errorf("kind bytes: %d bytes is more than the %d a bytes edit may change", len(e.Expect), MaxEditBytes)
		}
		if bytes.Equal(e.Expect, e.Replace) {
			return fmt.Errorf("kind bytes: replace equals expect, the edit changes nothing")
		}
	case "":
		return fmt.Errorf("kind missing (return, bytes or replace)")
	default:
		return fmt.Errorf("unknown kind %q (want return, bytes or replace)", e.Kind)
	}
	return nil
}

func (e *Edit) posText() string {
	t := ""
	if e.Module != "" {
		t = " [" + e.Module + "]"
	}
	if e.Sympos == nil {
		return t
	}
	return t + fmt.Sprintf(" (sympos %d)", *e.Sympos)
}

// String describes an edit in a line.
func (e *Edit) String() string {
	switch e.Kind {
	case KindReturn:
		if e.Void {
			return fmt.Sprintf("return from %s%s at once", e.Function, e.posText())
		}
		return fmt.Sprintf("%s%s returns %d at once", e.Function, e.posText(), *e.Value)
	case KindBytes:
		return fmt.Sprintf("%s%s+%#x: %s -> %s", e.Symbol, e.posText(), *e.Offset, FormatHex(e.Expect), FormatHex(e.Replace))
	case KindReplace:
		return fmt.Sprintf("replace %s%s with %s from %s", e.Function, e.posText(), e.With, e.Object)
	}
	return e.Kind
}
