package main

import (
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newPsCmd) }

// taskJSON is the JSON of one process (tests decode it).
type taskJSON = service.Task

func newPsCmd(a *app) *cobra.Command {
	var src kernelSource
	cmd := &cobra.Command{
		Use:   "ps DOMAIN | ps --dump FILE",
		Short: "List the guest's processes from the kernel's task list",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, _, err := src.split(args, 0, "ps DOMAIN")
			if err != nil {
				return err
			}
			res, err := kernelQuery(cmd, a, &src, source, "ps", nil, func(k *introspect.Kernel) (service.Tasks, error) {
				return service.Ps(source, k)
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
