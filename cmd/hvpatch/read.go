package main

import (
	"encoding/hex"
	"fmt"
	"io"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/spf13/cobra"
)

func init() { addCommand(newReadCmd) }

// maxVirtRead bounds one "read": the output is a hex dump or a listing.
const maxVirtRead = 1 << 20

type instJSON struct {
	Addr  string `json:"addr"`
	Where string `json:"where,omitempty"`
	Len   int    `json:"len"`
	Bytes string `json:"bytes"`
	Text  string `json:"text"`
}

func newReadCmd(a *app) *cobra.Command {
	var src kernelSource
	var disasm bool
	cmd := &cobra.Command{
		Use:   "read DOMAIN SYMBOL[+OFF]|ADDR LEN [--disasm] | read --dump FILE SYMBOL|ADDR LEN",
		Short: "Read guest kernel memory at a symbol or virtual address",
		Args:  cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, rest, err := src.split(args, 2, "read DOMAIN SYMBOL|ADDR LEN")
			if err != nil {
				return err
			}
			n, err := parseNum(rest[1])
			if err != nil || n == 0 || n > maxVirtRead {
				return fmt.Errorf("LEN %q: want a number of bytes from 1 to %d", rest[1], maxVirtRead)
			}
			k, done, err := src.open(cmd, a, source)
			if err != nil {
				return err
			}
			defer done()
			addr, err := resolveTarget(k, rest[0])
			if err != nil {
				return fmt.Errorf("%s: %w", source, err)
			}
			buf := make([]byte, n)
			if err := k.AS.ReadVirt(addr, buf); err != nil {
				return fmt.Errorf("%s: %w", source, err)
			}
			if disasm {
				// Like objdump: list every instruction that starts in the
				// range, so read up to one maximal instruction past it.
				more := make([]byte, n+15)
				if k.AS.ReadVirt(addr, more) == nil {
					buf = more
				}
			}
			if !disasm {
				type result struct {
					Source string `json:"source"`
					Addr   string `json:"addr"`
					Length int    `json:"length"`
					Hex    string `json:"hex"`
				}
				res := result{Source: source, Addr: fmt.Sprintf("%#x", addr), Length: len(buf), Hex: hex.EncodeToString(buf)}
				return a.out.Emit(res, func(w io.Writer) error { return hexDump(w, addr, buf) })
			}
			insts, derr := introspect.Disassemble(buf, addr)
			out := make([]instJSON, 0, len(insts))
			end := addr + n
			if len(insts) > 0 && insts[len(insts)-1].Addr+uint64(insts[len(insts)-1].Len) >= end {
				derr = nil // stopped only in the bytes past the range
			}
			for _, in := range insts {
				if in.Addr >= end {
					break
				}
				out = append(out, instJSON{Addr: fmt.Sprintf("%#x", in.Addr), Where: where(k, in.Addr), Len: in.Len,
					Bytes: hex.EncodeToString(in.Bytes), Text: in.Text})
			}
			err = a.out.Emit(out, func(w io.Writer) error {
				for _, in := range out {
					if _, err := fmt.Fprintf(w, "%s %-28s %-24s %s\n", in.Addr, "<"+in.Where+">:", spaced(in.Bytes), in.Text); err != nil {
						return err
					}
				}
				return nil
			})
			if err == nil && derr != nil {
				// Running out of bytes mid-instruction is the usual end of a
				// fixed-length listing; report it, after what was decoded.
				return fmt.Errorf("%s: disassembly stopped %w", source, derr)
			}
			return err
		},
	}
	src.flags(cmd)
	cmd.Flags().BoolVar(&disasm, "disasm", false, "disassemble instead of a hex dump")
	return cmd
}

// where is "symbol+0xoff" for an address, or "" when no symbol holds it.
func where(k *introspect.Kernel, addr uint64) string {
	s, off, ok := resolveAddr(k, addr)
	if !ok {
		return ""
	}
	return fmt.Sprintf("%s+%#x", s.Name, off)
}

func spaced(h string) string {
	var b []byte
	for i := 0; i < len(h); i += 2 {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, h[i:i+2]...)
	}
	return string(b)
}
