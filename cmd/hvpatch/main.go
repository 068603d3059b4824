// Command hvpatch patches the kernels of running Linux VMs from the host.
package main

import (
	"fmt"
	"os"
	"strings"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		// One line on stderr: multi-line errors (monitor output) are folded.
		msg := strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", " ; ")), " ")
		fmt.Fprintln(os.Stderr, "hvpatch: "+msg)
		os.Exit(1)
	}
}
