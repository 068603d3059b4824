package main

import (
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newDomainsCmd) }

func newDomainsCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "domains",
		Short: "List libvirt domains",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			var doms service.Domains
			c, err := a.daemon()
			if err != nil {
				return err
			}
			if c != nil {
				if err := c.get(ctx, "/domains", nil, &doms); err != nil {
					return err
				}
			} else {
				conn, err := a.Connect(ctx)
				if err != nil {
					return err
				}
				if doms, err = conn.Domains(ctx); err != nil {
					return err
				}
			}
			return a.out.Emit(doms, doms.WriteText)
		},
	}
}
