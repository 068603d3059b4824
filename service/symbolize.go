package service

import (
	"fmt"
	"strings"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// symbolizer names code addresses for a listing: kernel symbols, then
// loaded modules' own symbols ("sym+off [module]"; "[module]+off" where a
// module's table cannot be read or has no symbol near), then
// the functions hvpatch placed in its code area. Modules and the code area
// are read once, and only when an address falls outside the kernel image.
type symbolizer struct {
	k      *introspect.Kernel
	loaded bool
	mods   []introspect.Module
	msyms  *symbols.Table
	area   []codearea.Entry
}

func newSymbolizer(k *introspect.Kernel) *symbolizer { return &symbolizer{k: k} }

// name is "sym+0xoff" ("sym" at offset 0 unless always is set), or "".
func (s *symbolizer) name(addr uint64, always bool) string {
	withOff := func(name string, off uint64) string {
		if off == 0 && !always {
			return name
		}
		return fmt.Sprintf("%s+%#x", name, off)
	}
	if sym, off, ok := ResolveAddr(s.k, addr); ok {
		return withOff(sym.Name, off)
	}
	if addr >= s.k.TextStart && addr < s.k.TextEnd {
		return ""
	}
	s.load()
	for _, e := range s.area {
		if addr >= e.Entry && addr < e.Entry+max(e.TextSize, 1) {
			return withOff(e.Name, addr-e.Entry) + " [hvpatch]"
		}
	}
	if sym, off, ok := resolveModuleAddr(s.msyms, addr); ok {
		return withOff(sym.Name, off) + " [" + sym.Module + "]"
	}
	for _, m := range s.mods {
		if addr >= m.Base && addr < m.Base+m.Size {
			return withOff("["+m.Name+"]", addr-m.Base)
		}
	}
	return ""
}

func (s *symbolizer) load() {
	if s.loaded {
		return
	}
	s.loaded = true
	s.mods, _ = s.k.Modules()
	s.msyms = moduleTable(s.k)
	if a, err := codearea.Find(s.k); err == nil && a.Mapped() {
		s.area = a.Entries()
	}
}

// annotate adds the target's name to an instruction's text the way crash's
// dis (and objdump) show it: "call 0xffffffff8134c2a0 <seq_printf>" for a
// branch, "# 0xffffffff82a1b2c8 <jiffies>" after a RIP-relative operand.
func annotate(in introspect.Inst, name string) string {
	target := fmt.Sprintf("%#x", in.Target)
	switch in.Kind {
	case introspect.Branch:
		if name != "" && strings.HasSuffix(in.Text, target) {
			return in.Text + " <" + name + ">"
		}
	case introspect.Mem:
		c := "        # " + target
		if name != "" {
			c += " <" + name + ">"
		}
		return in.Text + c
	}
	return in.Text
}

// padMnemonic pads the mnemonic to a column, as objdump and crash print
// instructions ("push   %rbp").
func padMnemonic(text string) string {
	mn, rest, ok := strings.Cut(text, " ")
	if !ok {
		return text
	}
	return fmt.Sprintf("%-6s %s", mn, rest)
}
