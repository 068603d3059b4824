package main

import (
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/symbols"
	"github.com/spf13/cobra"
)

func init() {
	addCommand(newSymCmd)
	addCommand(newSymsCmd)
}

type symbolJSON struct {
	Name   string `json:"name"`
	Addr   string `json:"addr"`
	Type   string `json:"type"`
	Module string `json:"module,omitempty"`
	Size   uint64 `json:"size,omitempty"`
	Offset uint64 `json:"offset,omitempty"`
}

func toJSON(t *symbols.Table, s symbols.Symbol) symbolJSON {
	j := symbolJSON{Name: s.Name, Addr: hexAddr(s.Addr), Type: string(s.Type), Module: s.Module}
	if symbols.IsText(s.Type) {
		j.Size = t.FunctionSize(s)
	}
	return j
}

func newSymCmd(a *app) *cobra.Command {
	var src kernelSource
	cmd := &cobra.Command{
		Use:   "sym DOMAIN NAME|ADDR | sym --dump FILE NAME|ADDR",
		Short: "Look up a kernel symbol by name, or the symbol holding an address",
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, rest, err := src.split(args, 1, "sym DOMAIN NAME|ADDR")
			if err != nil {
				return err
			}
			k, done, err := src.open(cmd, a, source)
			if err != nil {
				return err
			}
			defer done()
			q := rest[0]
			if addr, err := strconv.ParseUint(q, 0, 64); err == nil && strings.HasPrefix(q, "0x") {
				s, off, ok := resolveAddr(k, addr)
				if !ok {
					return fmt.Errorf("%s: no symbol holds address %#x", source, addr)
				}
				j := toJSON(k.Symbols, s)
				j.Offset = off
				return a.out.Emit(j, func(w io.Writer) error {
					_, err := fmt.Fprintf(w, "%016x %c %s+%#x%s\n", addr, s.Type, s.Name, off, moduleSuffix(s))
					return err
				})
			}
			found := k.Symbols.Lookup(q)
			if len(found) == 0 {
				return fmt.Errorf("%s: no symbol %q in the guest kernel (%s)", source, q, k.Release)
			}
			var out []symbolJSON
			for _, s := range found {
				out = append(out, toJSON(k.Symbols, s))
			}
			return a.out.Emit(out, func(w io.Writer) error {
				for _, s := range found {
					size := ""
					if n := k.Symbols.FunctionSize(s); n > 0 && symbols.IsText(s.Type) {
						size = fmt.Sprintf(" (size %#x)", n)
					}
					if _, err := fmt.Fprintf(w, "%016x %c %s%s%s\n", s.Addr, s.Type, s.Name, moduleSuffix(s), size); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
	src.flags(cmd)
	return cmd
}

func moduleSuffix(s symbols.Symbol) string {
	if s.Module == "" {
		return ""
	}
	return "\t[" + s.Module + "]"
}

func newSymsCmd(a *app) *cobra.Command {
	var src kernelSource
	var grep string
	cmd := &cobra.Command{
		Use:   "syms DOMAIN [--grep RE] | syms --dump FILE [--grep RE]",
		Short: "List the guest kernel's symbols in /proc/kallsyms format",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var re *regexp.Regexp
			if grep != "" {
				var err error
				if re, err = regexp.Compile(grep); err != nil {
					return fmt.Errorf("--grep %q: %w", grep, err)
				}
			}
			source, _, err := src.split(args, 0, "syms DOMAIN")
			if err != nil {
				return err
			}
			k, done, err := src.open(cmd, a, source)
			if err != nil {
				return err
			}
			defer done()
			table := k.Symbols
			if re != nil {
				var keep []symbols.Symbol
				for _, s := range table.All() {
					if re.MatchString(s.Name) {
						keep = append(keep, s)
					}
				}
				table = symbols.NewTable(keep)
			}
			if a.out.JSON {
				out := make([]symbolJSON, 0, table.Len())
				for _, s := range table.All() {
					out = append(out, symbolJSON{Name: s.Name, Addr: hexAddr(s.Addr), Type: string(s.Type), Module: s.Module})
				}
				return a.out.Emit(out, nil)
			}
			return table.WriteKallsyms(cmd.OutOrStdout())
		},
	}
	src.flags(cmd)
	cmd.Flags().StringVar(&grep, "grep", "", "only symbols whose name matches this regular expression")
	return cmd
}

// resolveAddr is Table.Resolve limited to where symbols are dense: inside
// the kernel image, or among the zero-based per-CPU (absolute) symbols.
// Elsewhere the nearest symbol below is meaningless.
func resolveAddr(k *introspect.Kernel, addr uint64) (symbols.Symbol, uint64, bool) {
	s, off, ok := k.Symbols.Resolve(addr)
	if !ok {
		return s, off, false
	}
	if s.Addr >= k.TextStart {
		return s, off, addr < k.TextEnd
	}
	return s, off, s.Type != 'A' && s.Type != 'a' || off < 1<<20
}

// resolveTarget turns SYMBOL, SYMBOL+OFF or ADDR into an address.
func resolveTarget(k *introspect.Kernel, s string) (uint64, error) {
	if strings.HasPrefix(s, "0x") {
		return strconv.ParseUint(s, 0, 64)
	}
	name, offStr, hasOff := strings.Cut(s, "+")
	addr, err := k.Symbols.Addr(name)
	if err != nil {
		return 0, err
	}
	if hasOff {
		off, err := strconv.ParseUint(offStr, 0, 64)
		if err != nil {
			return 0, fmt.Errorf("offset %q in %q: %w", offStr, s, err)
		}
		addr += off
	}
	return addr, nil
}
