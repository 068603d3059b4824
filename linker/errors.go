package linker

import (
	"debug/elf"
	"fmt"
	"strings"
)

// SectionError refuses a section the code area cannot hold safely.
type SectionError struct {
	Section string
	Reason  string
}

func (e *SectionError) Error() string {
	return fmt.Sprintf("section %s refused: %s", e.Section, e.Reason)
}

// SymbolError refuses a symbol (weak undefined, TLS, missing entry, ...).
type SymbolError struct {
	Symbol string
	Reason string
}

func (e *SymbolError) Error() string {
	return fmt.Sprintf("symbol %s: %s", e.Symbol, e.Reason)
}

// RelocError names one relocation that cannot be applied.
type RelocError struct {
	Section string
	Offset  uint64
	Type    elf.R_X86_64
	Symbol  string
	Addend  int64
	Reason  string
}

func (e *RelocError) Error() string {
	return fmt.Sprintf("relocation %v at %s+%#x against %s%+d: %s", e.Type, e.Section, e.Offset, symbolLabel(e.Symbol), e.Addend, e.Reason)
}

func symbolLabel(name string) string {
	if name == "" {
		return "(no symbol)"
	}
	return name
}

// UnresolvedError lists every undefined symbol the guest's kallsyms lacks.
type UnresolvedError struct {
	Names []string
}

func (e *UnresolvedError) Error() string {
	return fmt.Sprintf("%d unresolved symbol(s), not in the guest's kallsyms: %s", len(e.Names), strings.Join(e.Names, ", "))
}

// SizeError says an area is too small for the sections placed in it.
type SizeError struct {
	Area     string // "text" or "data"
	Need     uint64
	Limit    uint64
	Sections []string // the sections placed in that area
}

func (e *SizeError) Error() string {
	return fmt.Sprintf("%s area too small: need %#x bytes for %s, limit %#x", e.Area, e.Need, strings.Join(e.Sections, ", "), e.Limit)
}
