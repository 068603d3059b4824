package main

import (
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newDomainsCmd) }

func newDomainsCmd(a *app) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "domains",
		Short: "List libvirt domains, like virsh list",
		Long: "Lists the active domains, running first by id then by name, as virsh list does;\n" +
			"--all lists the inactive ones too (after the active ones, by name).",
		Args: cobra.NoArgs,
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
			doms = doms.Listed(all)
			return a.out.Emit(doms, doms.WriteText)
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "list inactive domains too, like virsh list --all")
	return cmd
}
