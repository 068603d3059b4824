package main

import (
	"io"
	"strconv"

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
			c, err := a.Connect(ctx)
			if err != nil {
				return err
			}
			doms, err := c.Domains(ctx)
			if err != nil {
				return err
			}
			return a.out.Emit(doms, func(w io.Writer) error {
				rows := make([][]string, len(doms))
				for i, d := range doms {
					id := "-"
					if d.ID > 0 {
						id = strconv.Itoa(d.ID)
					}
					rows[i] = []string{id, d.Name, d.State, d.UUID}
				}
				return Table(w, []string{"id", "name", "state", "uuid"}, rows)
			})
		},
	}
}
