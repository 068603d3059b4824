package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func init() { addCommand(newPsCmd) }

type taskJSON struct {
	PID          int    `json:"pid"`
	PPID         int    `json:"ppid"`
	State        string `json:"state"`
	Comm         string `json:"comm"`
	Task         string `json:"task"`
	StackPointer string `json:"stack_pointer"`
}

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
			k, done, err := src.open(cmd, a, source)
			if err != nil {
				return err
			}
			defer done()
			tasks, err := k.Tasks()
			if err != nil {
				return fmt.Errorf("%s: %w", source, err)
			}
			out := make([]taskJSON, 0, len(tasks))
			for _, t := range tasks {
				out = append(out, taskJSON{PID: t.PID, PPID: t.PPID, State: t.StateLetter(), Comm: t.Comm,
					Task: hexAddr(t.Addr), StackPointer: hexAddr(t.StackPointer)})
			}
			return a.out.Emit(out, func(w io.Writer) error {
				rows := make([][]string, 0, len(out))
				for _, t := range out {
					rows = append(rows, []string{fmt.Sprint(t.PID), fmt.Sprint(t.PPID), t.State, t.Comm, t.Task})
				}
				return Table(w, []string{"pid", "ppid", "s", "comm", "task"}, rows)
			})
		},
	}
	src.flags(cmd)
	return cmd
}
