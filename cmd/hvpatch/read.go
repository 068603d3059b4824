package main

import (
	"fmt"
	"net/url"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newReadCmd) }

// instJSON is the JSON of one disassembled instruction (tests decode it).
type instJSON = service.Inst

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
			if err != nil || n == 0 || n > service.MaxVirtRead {
				return fmt.Errorf("LEN %q: want a number of bytes from 1 to %d", rest[1], service.MaxVirtRead)
			}
			q := url.Values{"target": {rest[0]}, "len": {fmt.Sprint(n)}}
			if disasm {
				q.Set("disasm", "1")
			}
			res, err := kernelQuery(cmd, a, &src, source, "read", q, func(k *introspect.Kernel) (service.ReadResult, error) {
				return service.Read(source, k, rest[0], n, disasm)
			})
			if err != nil {
				return err
			}
			if err := a.out.Emit(res.JSON(), res.WriteText); err != nil {
				return err
			}
			return res.Err()
		},
	}
	src.flags(cmd)
	cmd.Flags().BoolVar(&disasm, "disasm", false, "disassemble instead of a hex dump")
	return cmd
}
