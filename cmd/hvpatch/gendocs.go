package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

func init() { addCommand(newGenDocsCmd) }

// newGenDocsCmd writes a man page per command with cobra's doc package
// (make install runs it). Hidden: it is for packaging, not for operators.
func newGenDocsCmd(a *app) *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:     "gendocs --man DIR",
		Short:   "Write the man pages of hvpatch and its commands (section 1) into DIR",
		Hidden:  true,
		Args:    cobra.NoArgs,
		Example: "  hvpatch gendocs --man /usr/local/share/man/man1",
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usageErr(cmd, "hvpatch gendocs: --man DIR is required")
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			root := cmd.Root()
			// The completion command is otherwise added only when the
			// command line is executed: give it its pages too.
			root.InitDefaultCompletionCmd()
			forEachCommand(root, func(c *cobra.Command) { c.DisableAutoGenTag = true })
			header := &doc.GenManHeader{Section: "1", Source: "hvpatch " + root.Version, Manual: "hvpatch manual"}
			if err := doc.GenManTree(root, header, dir); err != nil {
				return fmt.Errorf("man pages: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "man", "", "directory for the man pages")
	return cmd
}
