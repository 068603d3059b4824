package linker

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// LinkMap describes a link: where each section went, what each symbol
// resolved to and what each relocation wrote. `hvpatch apply --dry-run`
// prints it with Format.
type LinkMap struct {
	Entry     string `json:"entry"`
	EntryAddr uint64 `json:"entry_addr"`
	TextBase  uint64 `json:"text_base"`
	TextSize  uint64 `json:"text_size"`
	TextLimit uint64 `json:"text_limit"`
	DataBase  uint64 `json:"data_base"`
	DataSize  uint64 `json:"data_size"`
	DataLimit uint64 `json:"data_limit"`

	Sections    []PlacedSection  `json:"sections"`
	Ignored     []IgnoredSection `json:"ignored,omitempty"`
	Symbols     []DefinedSymbol  `json:"symbols"`
	Imports     []ImportedSymbol `json:"imports"`
	Relocations []AppliedReloc   `json:"relocations"`

	// What the linker did in place of the kernel's own boot/module-load
	// processing of special sections, decided from the guest's state.
	JumpLabels   []JumpLabelSite `json:"jump_labels,omitempty"`
	Alternatives []AltSite       `json:"alternatives,omitempty"`
	Bugs         []BugSite       `json:"bugs,omitempty"`
	// Notes say what differs from the guest's own code: sites frozen at
	// link time, WARNs silenced, sections dropped.
	Notes []string `json:"notes,omitempty"`
}

// JumpLabelSite is one static-branch site as set at link time.
type JumpLabelSite struct {
	Site    string `json:"site"` // function+offset
	Addr    uint64 `json:"addr"`
	Size    int    `json:"size"` // 2 or 5
	Key     string `json:"key"`  // symbol of the struct static_key
	KeyAddr uint64 `json:"key_addr"`
	Branch  bool   `json:"branch"`  // jump_entry branch bit (likely on a false key / unlikely on a true key)
	Enabled bool   `json:"enabled"` // static_key_enabled() at link time
	Jump    bool   `json:"jump"`    // jmp written (else the NOP)
	Target  uint64 `json:"target"`
	Note    string `json:"note,omitempty"`
}

// AltSite is one alternative as decided at link time.
type AltSite struct {
	Site       string `json:"site"`
	Addr       uint64 `json:"addr"`
	Len        int    `json:"len"`
	Feature    uint16 `json:"feature"` // X86_FEATURE_* / X86_BUG_* bit number
	Not        bool   `json:"not,omitempty"`
	FeatureSet bool   `json:"feature_set"`
	Applied    bool   `json:"applied"` // replacement copied over the original
	ReplAddr   uint64 `json:"repl_addr"`
	ReplLen    int    `json:"repl_len"`
}

// BugSite is a BUG()/WARN() trap site.
type BugSite struct {
	Site  string `json:"site"`
	Addr  uint64 `json:"addr"`
	File  string `json:"file,omitempty"`
	Line  int    `json:"line"`
	Flags uint16 `json:"flags"`
	Warn  bool   `json:"warn"` // WARN: ud2 replaced by a NOP; BUG: ud2 kept
}

// PlacedSection is a section copied into the text or data image.
type PlacedSection struct {
	Name       string `json:"name"`
	Area       string `json:"area"` // "text" or "data"
	Addr       uint64 `json:"addr"`
	Size       uint64 `json:"size"`
	Align      uint64 `json:"align"`
	ZeroFilled bool   `json:"zero_filled,omitempty"` // bss
}

// IgnoredSection is a section left out, with the reason it is harmless.
type IgnoredSection struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// DefinedSymbol is a symbol the object defines, at its linked address.
type DefinedSymbol struct {
	Name    string `json:"name"`
	Addr    uint64 `json:"addr"`
	Size    uint64 `json:"size"`
	Section string `json:"section"`
	Global  bool   `json:"global"`
	Type    string `json:"type"` // func, object, notype
}

// ImportedSymbol is an undefined symbol and the guest address it resolved to.
type ImportedSymbol struct {
	Name string `json:"name"`
	Addr uint64 `json:"addr"`
}

// AppliedReloc is one relocation as applied.
type AppliedReloc struct {
	Section string `json:"section"`
	Offset  uint64 `json:"offset"` // within Section
	Addr    uint64 `json:"addr"`   // guest address of the patched field
	Type    string `json:"type"`
	Symbol  string `json:"symbol"`
	Addend  int64  `json:"addend"`
	Target  uint64 `json:"target"` // symbol value S
	Width   int    `json:"width"`  // bytes written
	Value   uint64 `json:"value"`  // the field as written (Width bytes, little-endian)
	Note    string `json:"note,omitempty"`
}

// Format writes the map for people.
func (m LinkMap) Format(w io.Writer) {
	fmt.Fprintf(w, "entry %s at %#x\n", m.Entry, m.EntryAddr)
	fmt.Fprintf(w, "text  %#x  %#x bytes (limit %#x)  RX\n", m.TextBase, m.TextSize, m.TextLimit)
	fmt.Fprintf(w, "data  %#x  %#x bytes (limit %#x)  RW+NX\n", m.DataBase, m.DataSize, m.DataLimit)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\nsections:")
	fmt.Fprintln(tw, "  area\taddress\tsize\talign\tname")
	for _, s := range m.Sections {
		name := s.Name
		if s.ZeroFilled {
			name += " (zero-filled)"
		}
		fmt.Fprintf(tw, "  %s\t%#x\t%#x\t%d\t%s\n", s.Area, s.Addr, s.Size, s.Align, name)
	}
	if len(m.Ignored) > 0 {
		fmt.Fprintln(tw, "\nignored sections:")
		for _, s := range m.Ignored {
			fmt.Fprintf(tw, "  %s\t%s\n", s.Name, s.Reason)
		}
	}
	fmt.Fprintln(tw, "\nsymbols defined:")
	for _, s := range m.Symbols {
		bind := "local"
		if s.Global {
			bind = "global"
		}
		fmt.Fprintf(tw, "  %#x\t%s\t%s\t%#x bytes\t%s\t%s\n", s.Addr, s.Type, bind, s.Size, s.Section, s.Name)
	}
	fmt.Fprintln(tw, "\nkernel symbols used (from kallsyms):")
	if len(m.Imports) == 0 {
		fmt.Fprintln(tw, "  none")
	}
	for _, s := range m.Imports {
		fmt.Fprintf(tw, "  %#x\t%s\n", s.Addr, s.Name)
	}
	fmt.Fprintln(tw, "\nrelocations:")
	fmt.Fprintln(tw, "  site\taddress\ttype\tsymbol+addend\tS\twritten")
	for _, r := range m.Relocations {
		written := fmt.Sprintf("%#0*x", 2*r.Width, r.Value)
		if r.Type == "R_X86_64_PC32" || r.Type == "R_X86_64_PLT32" {
			written += fmt.Sprintf(" (%+d)", int32(r.Value))
		}
		if r.Note != "" {
			written = r.Note
		}
		fmt.Fprintf(tw, "  %s+%#x\t%#x\t%s\t%s%+d\t%#x\t%s\n", r.Section, r.Offset, r.Addr, r.Type, symbolLabel(r.Symbol), r.Addend, r.Target, written)
	}
	if len(m.JumpLabels) > 0 {
		fmt.Fprintln(tw, "\njump labels (set at link time from the keys' state):")
		fmt.Fprintln(tw, "  site\taddress\tkey\tenabled\tbranch\twritten")
		for _, j := range m.JumpLabels {
			w := fmt.Sprintf("nop%d", j.Size)
			if j.Jump {
				w = fmt.Sprintf("jmp %#x", j.Target)
			}
			if j.Note != "" {
				w += " (" + j.Note + ")"
			}
			fmt.Fprintf(tw, "  %s\t%#x\t%s@%#x\t%v\t%v\t%s\n", j.Site, j.Addr, j.Key, j.KeyAddr, j.Enabled, j.Branch, w)
		}
	}
	if len(m.Alternatives) > 0 {
		fmt.Fprintln(tw, "\nalternatives:")
		fmt.Fprintln(tw, "  site\taddress\tfeature\tset\tresult")
		for _, a := range m.Alternatives {
			f := fmt.Sprintf("%d*32+%d", a.Feature/32, a.Feature%32)
			if a.Not {
				f = "!" + f
			}
			res := fmt.Sprintf("original kept (%d bytes)", a.Len)
			if a.Applied {
				res = fmt.Sprintf("replacement (%d of %d bytes) from %#x", a.ReplLen, a.Len, a.ReplAddr)
			}
			fmt.Fprintf(tw, "  %s\t%#x\t%s\t%v\t%s\n", a.Site, a.Addr, f, a.FeatureSet, res)
		}
	}
	if len(m.Notes) > 0 {
		fmt.Fprintln(tw, "\nnotes:")
		for _, n := range m.Notes {
			fmt.Fprintf(tw, "  %s\n", n)
		}
	}
	tw.Flush()
}
