package codearea

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"strings"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
	"github.com/hvpatch/hvpatch/symbols"
)

// FentryNop is the 5-byte NOP dynamic ftrace leaves at every traceable
// function's entry on kernels since 5.15; endbr64 precedes it on IBT
// kernels.
var (
	FentryNop = []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
	Endbr64   = []byte{0xf3, 0x0f, 0x1e, 0xfa}
)

// FentryNops are every 5-byte NOP an x86-64 kernel may have written at an
// fentry site. ftrace writes ideal_nops[NOP_ATOMIC5] there (ftrace_nop_replace,
// arch/x86/kernel/ftrace.c), a single instruction ("*_NOP5_ATOMIC must be a
// single instruction", arch/x86/include/asm/nops.h):
//   - P6_NOP5_ATOMIC = P6_NOP5, nopl 0x0(%rax,%rax,1): Intel CPUs with NOPL,
//     AMD family > 0xf and Hygon (arch_init_ideal_nops), and the only form
//     since 5.15, when commit a89dfde3dc3c "x86: Remove dynamic NOP
//     selection" fixed x86_nops[] to it;
//   - K8_NOP5_ATOMIC, four operand-size prefixes and nop: up to 5.14 on any
//     other x86-64 CPU, such as QEMU's default models under TCG (AMD family
//     0xf), where 5.10 guests show it.
//
// The 32-bit GENERIC and K7 forms are not NOPs in 64-bit mode, and K8_NOP5
// (66 66 90 66 90) is two instructions that ftrace never writes at a call
// site; neither is accepted.
var FentryNops = [][]byte{
	FentryNop,
	{0x66, 0x66, 0x66, 0x66, 0x90},
}

// IsFentryNop reports whether b is one of FentryNops.
func IsFentryNop(b []byte) bool {
	for _, n := range FentryNops {
		if bytes.Equal(b, n) {
			return true
		}
	}
	return false
}

// JumpTo encodes "jmp rel32" at from to to: one 5-byte instruction, the
// size of the fentry NOP it replaces.
func JumpTo(from, to uint64) ([]byte, error) {
	rel := int64(to - (from + 5))
	if rel < math.MinInt32 || rel > math.MaxInt32 {
		return nil, fmt.Errorf("codearea: jump from %#x to %#x is out of rel32 reach", from, to)
	}
	b := make([]byte, 5)
	b[0] = 0xe9
	binary.LittleEndian.PutUint32(b[1:], uint32(int32(rel)))
	return b, nil
}

// JumpTarget decodes a "jmp rel32" at from.
func JumpTarget(from uint64, b []byte) (uint64, bool) {
	if len(b) < 5 || b[0] != 0xe9 {
		return 0, false
	}
	return from + 5 + uint64(int64(int32(binary.LittleEndian.Uint32(b[1:])))), true
}

// EntrySite finds the fentry site of a kernel function (its entry, or the
// entry + 4 after endbr64) and checks it holds one of FentryNops: anything
// else means ftrace, a livepatch or another tool owns it.
func EntrySite(k *introspect.Kernel, fn string) (uint64, error) {
	addr, err := k.Symbols.Addr(fn)
	if err != nil {
		return 0, err
	}
	var b [9]byte
	if err := k.AS.ReadVirt(addr, b[:]); err != nil {
		return 0, fmt.Errorf("codearea: reading %s at %#x: %w", fn, addr, err)
	}
	site, code := addr, b[:5]
	if bytes.HasPrefix(b[:], Endbr64) {
		site, code = addr+4, b[4:9]
	}
	if !IsFentryNop(code) {
		return 0, fmt.Errorf("codearea: %s at %#x: the fentry site holds % x, not a 5-byte NOP (% x) (traced or patched)", fn, site, code, FentryNops)
	}
	return site, nil
}

// LinkFor returns the linker options and resolver that make an object
// behave like the guest's own code around fn: returns as the guest
// returns from fn (a plain ret, or a jump to the return thunk the guest
// chose at boot; __x86_return_thunk is never taken from kallsyms, which on
// 6.12 points at a thunk that warns), every other name from kallsyms
// (ambiguous names are unresolved; "NAME,N" picks the N-th symbol called
// NAME in kallsyms address order, N from 1), and the guest's static-key
// states and CPU features for the object's jump labels and alternatives
// (guestspecial.go).
func LinkFor(k *introspect.Kernel, fn string) (linker.Options, linker.Resolver, error) {
	if _, err := k.Symbols.Addr(fn); err != nil {
		return linker.Options{}, nil, err
	}
	return LinkForSymbol(k, k.Symbols.Lookup(fn)[0])
}

// LinkForSymbol is LinkFor for one given symbol (one of several static
// functions of the same name).
func LinkForSymbol(k *introspect.Kernel, sym symbols.Symbol) (linker.Options, linker.Resolver, error) {
	size := k.Symbols.FunctionSize(sym)
	return linkFor(k, sym, size, func(name string) (uint64, bool) {
		if a, ok := resolveNth(k, name); ok {
			return a, true
		}
		a, err := k.Symbols.Addr(name)
		return a, err == nil
	})
}

// LinkForModuleSymbol is LinkForSymbol for a function of a loaded module.
// mods is every loaded module's symbols (introspect.Kernel.ModuleSymbols)
// and module the name of the one sym is in. The function's size and
// return style come from that module's own symbol table, and the resolver
// looks a name up there first:
//   - a name the module defines (its static functions and variables
//     included) is the module's: "NAME" when the module has one address
//     for it, "NAME,N" the N-th symbol called NAME in the module's table
//     in address order (N from 1), never another module's or the kernel's;
//   - any other name is the kernel image's (as LinkForSymbol resolves it,
//     "NAME,N" included), then a symbol another loaded module exports
//     (upper-case type) when exactly one address has that name.
func LinkForModuleSymbol(k *introspect.Kernel, mods []symbols.Symbol, module string, sym symbols.Symbol) (linker.Options, linker.Resolver, error) {
	var ownSyms []symbols.Symbol
	exported := map[string][]uint64{}
	for _, s := range mods {
		switch {
		case s.Module == module:
			ownSyms = append(ownSyms, s)
		case s.Type >= 'A' && s.Type <= 'Z':
			if l := exported[s.Name]; len(l) == 0 || l[len(l)-1] != s.Addr {
				exported[s.Name] = append(l, s.Addr)
			}
		}
	}
	own := symbols.NewTable(ownSyms)
	found := own.Lookup(sym.Name)
	in := false
	for _, s := range found {
		in = in || s.Addr == sym.Addr
	}
	if !in {
		return linker.Options{}, nil, fmt.Errorf("codearea: %s at %#x is not a symbol of module %s", sym.Name, sym.Addr, module)
	}
	size := own.FunctionSize(sym)
	if size == 0 {
		// The module's last function: up to its next symbol of any kind,
		// else the rest of its page (the scan needs only the first ret).
		size = pageSize - sym.Addr%pageSize
		if size < 64 {
			size += pageSize
		}
		for _, s := range own.All() {
			if s.Addr > sym.Addr {
				size = s.Addr - sym.Addr
				break
			}
		}
	}
	return linkFor(k, sym, size, func(name string) (uint64, bool) {
		base, n := splitNth(name)
		if l := own.Lookup(base); len(l) > 0 {
			if n > 0 {
				if n > len(l) {
					return 0, false
				}
				return l[n-1].Addr, true
			}
			a, err := own.Addr(base)
			return a, err == nil
		}
		if a, ok := resolveNth(k, name); ok {
			return a, true
		}
		if a, err := k.Symbols.Addr(name); err == nil {
			return a, true
		}
		if l := exported[name]; len(l) == 1 {
			return l[0], true
		}
		return 0, false
	})
}

// linkFor builds the options for code standing in for sym (size bytes
// long): its return style, the guest state, and lookup after the return
// thunk.
func linkFor(k *introspect.Kernel, sym symbols.Symbol, size uint64, lookup func(string) (uint64, bool)) (linker.Options, linker.Resolver, error) {
	var opt linker.Options
	fn, addr := sym.Name, sym.Addr
	if size == 0 || size > 1<<16 {
		return opt, nil, fmt.Errorf("codearea: %s: function size %d is not usable", fn, size)
	}
	code := make([]byte, size)
	if err := k.AS.ReadVirt(addr, code); err != nil {
		return opt, nil, err
	}
	insts, _ := introspect.Disassemble(code, addr) // up to the first undecodable byte
	thunk := uint64(0)
	plain := false
	for _, in := range insts {
		switch {
		case len(in.Bytes) == 1 && in.Bytes[0] == 0xc3:
			plain = true
		case len(in.Bytes) == 5 && in.Bytes[0] == 0xe9:
			to, _ := JumpTarget(in.Addr, in.Bytes)
			if s, off, ok := k.Symbols.Resolve(to); ok && off == 0 && strings.Contains(s.Name, "return_thunk") {
				thunk = to
			}
		}
		if plain || thunk != 0 {
			break
		}
	}
	switch {
	case plain:
		opt.PlainReturns = true
	case thunk == 0:
		return opt, nil, fmt.Errorf("codearea: %s at %#x: found neither a ret nor a jump to a return thunk in its %d bytes", fn, addr, size)
	}
	guestState(k, &opt)
	resolve := func(name string) (uint64, bool) {
		if name == linker.ReturnThunk {
			return thunk, thunk != 0
		}
		return lookup(name)
	}
	opt.Resolve, opt.ReadGuest = resolve, k.AS.ReadVirt
	return opt, resolve, nil
}
