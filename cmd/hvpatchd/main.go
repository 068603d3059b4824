// Command hvpatchd will serve hvpatch's API on a unix socket (issue 7).
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "hvpatchd: not implemented yet (issue 7)")
	os.Exit(2)
}
