package service

import (
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
)

// MaxVirtRead bounds one "read": the output is a hex dump or a listing.
const MaxVirtRead = 1 << 20

// MaxMemRead bounds one "mem read".
const MaxMemRead = 16 << 20

// Bytes is a hex dump of guest memory at a virtual (Addr) or physical
// (Phys) address.
type Bytes struct {
	Source string `json:"source"`
	Addr   string `json:"addr,omitempty"`
	Phys   string `json:"phys,omitempty"`
	Length int    `json:"length"`
	Hex    string `json:"hex"`
}

func (b Bytes) WriteText(w io.Writer) error {
	a := b.Addr
	if a == "" {
		a = b.Phys
	}
	addr, _ := strconv.ParseUint(a, 0, 64)
	return HexDump(w, addr, decodeHex(b.Hex))
}

// Inst is one disassembled instruction.
type Inst struct {
	Addr  string `json:"addr"`
	Where string `json:"where,omitempty"`
	Len   int    `json:"len"`
	Bytes string `json:"bytes"`
	Text  string `json:"text"`
	// Target is a call or jump's destination, or a RIP-relative operand's
	// address; TargetSym names it (symbol+offset, [module]+offset, or a
	// code-area function) when it resolves.
	Target    string `json:"target,omitempty"`
	TargetSym string `json:"target_sym,omitempty"`
}

// Listing is the answer to "read --disasm". Stopped is set when decoding
// stopped inside the range (the command reports it after the listing).
type Listing struct {
	Insts   []Inst `json:"insts"`
	Stopped string `json:"stopped,omitempty"`
}

func (l Listing) WriteText(w io.Writer) error {
	for _, in := range l.Insts {
		if _, err := fmt.Fprintf(w, "%s %-28s %-24s %s\n", Escape(in.Addr), "<"+Escape(in.Where)+">:", Escape(spaced(in.Bytes)), Escape(padMnemonic(in.Text))); err != nil {
			return err
		}
	}
	return nil
}

// Err is the error to report after printing the listing, or nil.
func (l Listing) Err() error {
	if l.Stopped == "" {
		return nil
	}
	return fmt.Errorf("%s", l.Stopped)
}

// ReadResult is the answer to "read": a hex dump, or with --disasm a listing.
type ReadResult struct {
	Bytes   *Bytes   `json:"bytes,omitempty"`
	Listing *Listing `json:"listing,omitempty"`
}

// Read reads n bytes of kernel virtual memory at target (SYMBOL[+OFF] or
// 0xADDR), as a hex dump or disassembled.
func Read(source string, k *introspect.Kernel, target string, n uint64, disasm bool) (ReadResult, error) {
	if n == 0 || n > MaxVirtRead {
		return ReadResult{}, fmt.Errorf("LEN %d: want a number of bytes from 1 to %d", n, MaxVirtRead)
	}
	addr, err := ResolveTarget(k, target)
	if err != nil {
		return ReadResult{}, fmt.Errorf("%s: %w", source, err)
	}
	buf := make([]byte, n)
	if err := k.AS.ReadVirt(addr, buf); err != nil {
		return ReadResult{}, fmt.Errorf("%s: %w", source, err)
	}
	if !disasm {
		return ReadResult{Bytes: &Bytes{Source: source, Addr: fmt.Sprintf("%#x", addr), Length: len(buf), Hex: hex.EncodeToString(buf)}}, nil
	}
	// Like objdump: list every instruction that starts in the range, so
	// read up to one maximal instruction past it.
	more := make([]byte, n+15)
	if k.AS.ReadVirt(addr, more) == nil {
		buf = more
	}
	insts, derr := introspect.Disassemble(buf, addr)
	l := &Listing{Insts: make([]Inst, 0, len(insts))}
	sym := newSymbolizer(k)
	end := addr + n
	if len(insts) > 0 && insts[len(insts)-1].Addr+uint64(insts[len(insts)-1].Len) >= end {
		derr = nil // stopped only in the bytes past the range
	}
	for _, in := range insts {
		if in.Addr >= end {
			break
		}
		out := Inst{Addr: fmt.Sprintf("%#x", in.Addr), Where: sym.name(in.Addr, true), Len: in.Len,
			Bytes: hex.EncodeToString(in.Bytes), Text: in.Text}
		if in.Kind != introspect.NoTarget {
			out.Target = HexAddr(in.Target)
			out.TargetSym = sym.name(in.Target, false)
			out.Text = annotate(in, out.TargetSym)
		}
		l.Insts = append(l.Insts, out)
	}
	if derr != nil {
		// Running out of bytes mid-instruction is the usual end of a
		// fixed-length listing; it is reported after what was decoded.
		l.Stopped = fmt.Sprintf("%s: disassembly stopped %v", source, derr)
	}
	return ReadResult{Listing: l}, nil
}

// JSON is what --json prints.
func (r ReadResult) JSON() any {
	if r.Listing != nil {
		return r.Listing.Insts
	}
	return r.Bytes
}

func (r ReadResult) WriteText(w io.Writer) error {
	if r.Listing != nil {
		return r.Listing.WriteText(w)
	}
	if r.Bytes != nil {
		return r.Bytes.WriteText(w)
	}
	return nil
}

// Err is the error to report after the output, or nil.
func (r ReadResult) Err() error {
	if r.Listing != nil {
		return r.Listing.Err()
	}
	return nil
}

// MemRead reads n bytes of guest-physical memory at gpa.
func MemRead(source string, m hypervisor.PhysMem, gpa, n uint64) (Bytes, error) {
	if n == 0 || n > MaxMemRead {
		return Bytes{}, fmt.Errorf("LEN %d: want a number of bytes from 1 to %d", n, MaxMemRead)
	}
	buf := make([]byte, n)
	if err := m.ReadPhys(gpa, buf); err != nil {
		return Bytes{}, fmt.Errorf("%s: %w", source, err)
	}
	return Bytes{Source: source, Phys: fmt.Sprintf("%#x", gpa), Length: len(buf), Hex: hex.EncodeToString(buf)}, nil
}

func spaced(h string) string {
	var b strings.Builder
	for i := 0; i+1 < len(h); i += 2 {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(h[i : i+2])
	}
	return b.String()
}
