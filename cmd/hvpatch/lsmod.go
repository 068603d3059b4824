package main

import (
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newLsmodCmd) }

// moduleJSON is the JSON of one module (tests decode it).
type moduleJSON = service.Module

func newLsmodCmd(a *app) *cobra.Command {
	var src kernelSource
	cmd := &cobra.Command{
		Use:   "lsmod DOMAIN | lsmod --dump FILE",
		Short: "List the guest kernel's loaded modules",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, _, err := src.split(args, 0, "lsmod DOMAIN")
			if err != nil {
				return err
			}
			res, err := kernelQuery(cmd, a, &src, source, "lsmod", nil, func(k *introspect.Kernel) (service.Modules, error) {
				return service.Lsmod(source, k)
			})
			if err != nil {
				return err
			}
			return a.out.Emit(res, res.WriteText)
		},
	}
	src.flags(cmd)
	return cmd
}
