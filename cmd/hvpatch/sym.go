package main

import (
	"net/url"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() {
	addCommand(newSymCmd)
	addCommand(newSymsCmd)
}

// symbolJSON is the JSON of one symbol (tests decode it).
type symbolJSON = service.Symbol

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
			q := rest[0]
			res, err := kernelQuery(cmd, a, &src, source, "sym", url.Values{"q": {q}}, func(k *introspect.Kernel) (service.SymLookup, error) {
				return service.Sym(source, k, q)
			})
			if err != nil {
				return err
			}
			return a.out.Emit(res.JSON(), res.WriteText)
		},
	}
	src.flags(cmd)
	return cmd
}

func newSymsCmd(a *app) *cobra.Command {
	var src kernelSource
	var grep string
	cmd := &cobra.Command{
		Use:   "syms DOMAIN [--grep RE] | syms --dump FILE [--grep RE]",
		Short: "List the guest kernel's symbols in /proc/kallsyms format",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, _, err := src.split(args, 0, "syms DOMAIN")
			if err != nil {
				return err
			}
			res, err := kernelQuery(cmd, a, &src, source, "syms", url.Values{"grep": {grep}}, func(k *introspect.Kernel) (service.SymbolList, error) {
				return service.Syms(k, grep)
			})
			if err != nil {
				return err
			}
			return a.out.Emit(res, res.WriteText)
		},
	}
	src.flags(cmd)
	cmd.Flags().StringVar(&grep, "grep", "", "only symbols whose name matches this regular expression")
	return cmd
}
