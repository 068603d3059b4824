package introspect

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// Inst is one decoded instruction.
type Inst struct {
	Addr  uint64
	Len   int
	Bytes []byte
	Text  string // AT&T syntax as objdump and crash's dis print it (immediates unsigned, call/ret/jmp without suffix)
	// Target is the address a relative branch or call goes to (Branch),
	// or the address a RIP-relative operand refers to (Mem); 0 if none.
	Target uint64
	Kind   TargetKind
}

// TargetKind says what an instruction's Target is.
type TargetKind uint8

const (
	NoTarget TargetKind = iota
	Branch              // a relative call or jump: Target is where it goes
	Mem                 // a RIP-relative memory operand: Target is its address
)

// fixedInsts are encodings x86asm gets wrong or rejects that kernel code
// uses. endbr64 in particular decodes as a lone 1-byte "rep" prefix, which
// would put every later boundary of an IBT function in the wrong place.
var fixedInsts = []struct {
	enc  []byte
	text string
}{
	{[]byte{0xf3, 0x0f, 0x1e, 0xfa}, "endbr64"},
	{[]byte{0xf3, 0x0f, 0x1e, 0xfb}, "endbr32"},
	{[]byte{0x0f, 0x01, 0xca}, "clac"},
	{[]byte{0x0f, 0x01, 0xcb}, "stac"},
	{[]byte{0x0f, 0x01, 0xe8}, "serialize"},
	{[]byte{0x0f, 0x01, 0xee}, "rdpkru"},
	{[]byte{0x0f, 0x01, 0xef}, "wrpkru"},
	{[]byte{0x0f, 0x01, 0xd5}, "xend"},
	{[]byte{0x0f, 0x01, 0xd6}, "xtest"},
	{[]byte{0x0f, 0x01, 0xf9}, "rdtscp"},
	{[]byte{0x0f, 0x01, 0xfa}, "monitorx"},
	{[]byte{0x0f, 0x01, 0xfb}, "mwaitx"},
	{[]byte{0x0f, 0x01, 0xfc}, "clzero"},
}

// InstructionAt returns the length of the instruction at the start of code.
func InstructionAt(code []byte) (int, error) {
	n, _, err := decodeOne(code, 0)
	return n, err
}

// Disassemble decodes code, whose first byte is at addr, from start to end.
// It stops with an error at the first byte sequence it cannot decode,
// returning the instructions before it.
func Disassemble(code []byte, addr uint64) ([]Inst, error) {
	var out []Inst
	for off := 0; off < len(code); {
		pc := addr + uint64(off)
		n, text, err := decodeOne(code[off:], pc)
		if err != nil {
			return out, fmt.Errorf("at %#x (bytes % x): %w", pc, code[off:min(off+8, len(code))], err)
		}
		in := Inst{Addr: pc, Len: n, Bytes: code[off : off+n], Text: text}
		in.Target, in.Kind = targetOf(code[off:off+n], pc)
		out = append(out, in)
		off += n
	}
	return out, nil
}

func decodeOne(code []byte, pc uint64) (int, string, error) {
	if len(code) == 0 {
		return 0, "", fmt.Errorf("no bytes to decode")
	}
	for _, f := range fixedInsts {
		if bytes.HasPrefix(code, f.enc) {
			return len(f.enc), f.text, nil
		}
	}
	if n, text, ok := decodeRDPID(code); ok {
		return n, text, nil
	}
	if n, ok, err := vexLength(code); ok {
		if err != nil {
			return 0, "", err
		}
		return n, "(vex/evex)", nil
	}
	inst, err := x86asm.Decode(code, 64)
	if err != nil {
		return 0, "", fmt.Errorf("x86 decode: %w", err)
	}
	if inst.Op == 0 {
		// x86asm returns a bare prefix for truncated input.
		return 0, "", fmt.Errorf("x86 decode: truncated or unknown instruction")
	}
	return inst.Len, gnuText(inst, pc), nil
}

// gnuText is x86asm's GNU syntax made to read like objdump's and crash's:
// immediates unsigned in their operand size (a kernel address is
// $0xffffffff82000000, not $-0x7e000000), and call, ret and jmp without
// the q suffix that objdump and gdb no longer print.
func gnuText(inst x86asm.Inst, pc uint64) string {
	text := x86asm.GNUSyntax(inst, pc, nil)
	mn, rest, _ := strings.Cut(text, " ")
	switch mn {
	case "callq", "retq", "jmpq":
		mn = strings.TrimSuffix(mn, "q")
	}
	if i := strings.Index(rest, "$-0x"); i >= 0 {
		end := i + 4
		for end < len(rest) && isHex(rest[end]) {
			end++
		}
		if v, err := strconv.ParseUint(rest[i+4:end], 16, 64); err == nil {
			bits := immBits(inst, mn)
			u := -v
			if bits < 64 {
				u &= 1<<bits - 1
			}
			rest = rest[:i] + "$" + fmt.Sprintf("%#x", u) + rest[end:]
		}
	}
	if rest == "" {
		return mn
	}
	return mn + " " + rest
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' }

// immBits is the operand size an immediate is shown in: the size suffix
// objdump prints (movb, cmpw, …), an 8- or 16-bit register operand, or the
// instruction's data size.
func immBits(inst x86asm.Inst, mn string) uint {
	op := strings.ToLower(inst.Op.String())
	if strings.HasPrefix(mn, op) && len(mn) == len(op)+1 {
		switch mn[len(op)] {
		case 'b':
			return 8
		case 'w':
			return 16
		case 'l':
			return 32
		case 'q':
			return 64
		}
	}
	for _, a := range inst.Args {
		if r, ok := a.(x86asm.Reg); ok {
			switch {
			case r >= x86asm.AL && r <= x86asm.R15B:
				return 8
			case r >= x86asm.AX && r <= x86asm.R15W:
				return 16
			}
		}
	}
	switch inst.DataSize {
	case 16, 32, 64:
		return uint(inst.DataSize)
	}
	return 64
}

// targetOf decodes the instruction again for its relative branch target or
// RIP-relative operand address.
func targetOf(b []byte, pc uint64) (uint64, TargetKind) {
	inst, err := x86asm.Decode(b, 64)
	if err != nil || inst.Op == 0 {
		return 0, NoTarget
	}
	next := pc + uint64(inst.Len)
	for _, a := range inst.Args {
		switch a := a.(type) {
		case x86asm.Rel:
			return next + uint64(int64(a)), Branch
		case x86asm.Mem:
			if a.Base == x86asm.RIP {
				return next + uint64(a.Disp), Mem
			}
		}
	}
	return 0, NoTarget
}

// decodeRDPID handles rdpid (F3 [REX] 0F C7 /7 with a register operand),
// which the kernel uses in its vDSO-style per-CPU helpers.
func decodeRDPID(code []byte) (int, string, bool) {
	i := 0
	if len(code) < 4 || code[0] != 0xf3 {
		return 0, "", false
	}
	i++
	if code[i]&0xf0 == 0x40 { // REX
		i++
	}
	if len(code) < i+3 || code[i] != 0x0f || code[i+1] != 0xc7 {
		return 0, "", false
	}
	modrm := code[i+2]
	if modrm>>6 != 3 || (modrm>>3)&7 != 7 {
		return 0, "", false
	}
	return i + 3, "rdpid", true
}

// vexLength measures VEX (C4/C5) and EVEX (62) encoded instructions, which
// x86asm does not decode at all. In 64-bit mode these bytes always start
// such a prefix. ok reports that code starts with one.
func vexLength(code []byte) (n int, ok bool, err error) {
	var prefix, opmap int
	switch code[0] {
	case 0xc5:
		prefix, opmap = 2, 1
	case 0xc4:
		if len(code) < 2 {
			return 0, true, fmt.Errorf("truncated VEX prefix")
		}
		prefix, opmap = 3, int(code[1]&0x1f)
	case 0x62:
		if len(code) < 2 {
			return 0, true, fmt.Errorf("truncated EVEX prefix")
		}
		prefix, opmap = 4, int(code[1]&0x07)
	default:
		return 0, false, nil
	}
	if len(code) < prefix+2 {
		return 0, true, fmt.Errorf("truncated VEX instruction")
	}
	if opmap < 1 || opmap > 3 {
		return 0, true, fmt.Errorf("VEX opcode map %d not supported", opmap)
	}
	op := code[prefix]
	n = prefix + 1
	if opmap == 1 && op == 0x77 {
		return n, true, nil // vzeroupper / vzeroall: no operands
	}
	m, err := modrmLength(code[n:])
	if err != nil {
		return 0, true, err
	}
	n += m
	imm := opmap == 3 // 0F3A map: always imm8
	if opmap == 1 {
		switch op {
		case 0x70, 0x71, 0x72, 0x73, 0xc2, 0xc4, 0xc5, 0xc6:
			imm = true
		}
	}
	if imm {
		n++
	}
	if n > len(code) {
		return 0, true, fmt.Errorf("truncated VEX instruction")
	}
	return n, true, nil
}

// modrmLength is the length of a ModRM byte with its SIB and displacement
// (64-bit addressing).
func modrmLength(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, fmt.Errorf("missing ModRM byte")
	}
	mod, rm := b[0]>>6, b[0]&7
	n := 1
	if mod == 3 {
		return n, nil
	}
	if rm == 4 { // SIB
		if len(b) < 2 {
			return 0, fmt.Errorf("missing SIB byte")
		}
		n++
		if mod == 0 && b[1]&7 == 5 {
			n += 4
		}
	}
	switch {
	case mod == 0 && rm == 5:
		n += 4 // RIP-relative
	case mod == 1:
		n++
	case mod == 2:
		n += 4
	}
	return n, nil
}
