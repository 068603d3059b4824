package service

import (
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
)

// moduleSymbols are the loaded modules' symbols in /proc/kallsyms order
// (introspect.Kernel.ModuleSymbols), nil when they cannot be read (no BTF,
// a module list or table the walk refuses).
func moduleSymbols(k *introspect.Kernel) []symbols.Symbol {
	syms, err := k.ModuleSymbols()
	if err != nil {
		return nil
	}
	return syms
}

// moduleReach is how far past a module symbol an address is still taken to
// be in it: module symbols are dense, and beyond the last one of a module
// the nearest symbol below means nothing.
const moduleReach = 1 << 16

// resolveModuleAddr names the module symbol holding addr.
func resolveModuleAddr(t *symbols.Table, addr uint64) (symbols.Symbol, uint64, bool) {
	if t == nil {
		return symbols.Symbol{}, 0, false
	}
	s, off, ok := t.Resolve(addr)
	if !ok || off >= moduleReach {
		return symbols.Symbol{}, 0, false
	}
	return s, off, true
}

// moduleTable is a table of the module symbols, for lookups (nil when there
// are none).
func moduleTable(k *introspect.Kernel) *symbols.Table {
	syms := moduleSymbols(k)
	if len(syms) == 0 {
		return nil
	}
	return symbols.NewTable(syms)
}
