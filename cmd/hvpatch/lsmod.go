package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func init() { addCommand(newLsmodCmd) }

type moduleJSON struct {
	Name string `json:"name"`
	Size uint64 `json:"size"`
	Base string `json:"base"`
}

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
			k, done, err := src.open(cmd, a, source)
			if err != nil {
				return err
			}
			defer done()
			mods, err := k.Modules()
			if err != nil {
				return fmt.Errorf("%s: %w", source, err)
			}
			out := make([]moduleJSON, 0, len(mods))
			for _, m := range mods {
				out = append(out, moduleJSON{Name: m.Name, Size: m.Size, Base: hexAddr(m.Base)})
			}
			return a.out.Emit(out, func(w io.Writer) error {
				rows := make([][]string, 0, len(out))
				for _, m := range out {
					rows = append(rows, []string{m.Name, fmt.Sprint(m.Size), m.Base})
				}
				return Table(w, []string{"module", "size", "base"}, rows)
			})
		},
	}
	src.flags(cmd)
	return cmd
}
