package main

import (
	"fmt"
	"net/url"
	"os"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newBTFCmd) }

func newBTFCmd(a *app) *cobra.Command {
	var src kernelSource
	var format, output string
	var types []string
	cmd := &cobra.Command{
		Use:   "btf DOMAIN [--format c] [--type NAME]... | btf --dump FILE [--format c]",
		Short: "Write a C header of the guest kernel's own types, from its BTF (like bpftool btf dump format c)",
		Long: "Writes the guest kernel's types as C, in dependency order, with forward declarations for\n" +
			"pointer cycles, anonymous structs and unions inline, bitfields, enums and typedefs; member\n" +
			"offsets and sizes are exactly the BTF's (explicit padding where the compiler would not put it).\n" +
			"A replacement function compiled against it uses the guest's exact types, with no kernel headers.\n" +
			"--type limits the header to named types (struct, union, enum, typedef) and functions (an extern\n" +
			"prototype) and what they hold by value; types reached only through pointers are declared.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if format != "c" {
				return usageErr(cmd, "--format %q: the one format is c", format)
			}
			source, _, err := src.split(args, 0, "btf DOMAIN")
			if err != nil {
				return err
			}
			q := url.Values{"format": {format}, "type": types}
			res, err := kernelQuery(cmd, a, &src, source, "btf", q, func(k *introspect.Kernel) (service.BTFHeader, error) {
				return service.BTFC(source, k, types)
			})
			if err != nil {
				return err
			}
			if output != "" && output != "-" {
				if err := os.WriteFile(output, []byte(res.Header), 0o644); err != nil {
					return err
				}
				if a.out.JSON {
					res.Header = ""
					return a.out.Emit(res, nil)
				}
				_, err := fmt.Fprintf(cmd.ErrOrStderr(), "hvpatch btf: %s: %d types, %d functions of %s\n", output, res.Types, res.Funcs, service.Escape(res.Release))
				return err
			}
			return a.out.Emit(res, res.WriteText)
		},
	}
	src.flags(cmd)
	cmd.Flags().StringVar(&format, "format", "c", "output format: c (a C header)")
	cmd.Flags().StringArrayVar(&types, "type", nil, "only this named type or function and what it needs (repeatable)")
	cmd.Flags().StringVarP(&output, "output", "o", "", "write the header to this file instead of stdout")
	return cmd
}
