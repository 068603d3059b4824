// Command hvpatch patches the kernels of running Linux VMs from the host.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hvpatch/hvpatch/service"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// Exit statuses: 1 for a failed command, 2 for wrong arguments or flags
// (with or without --json).
const (
	exitError = 1
	exitUsage = 2
)

// run executes the command line args and returns the exit status. A failed
// command prints one line on stderr, "hvpatch: MESSAGE", followed by the
// command's usage for a usage error; with --json, one JSON object instead:
// {"error": MESSAGE, "domain": DOMAIN, "kind": KIND}.
func run(args []string, stdout, stderr io.Writer) int {
	root, a := newRoot()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if err == nil {
		return 0
	}
	// One line: multi-line errors (monitor output) are folded.
	msg := strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", " ; ")), " ")
	code, kind := exitError, service.ErrorKind(err)
	var ue *usageError
	if errors.As(err, &ue) {
		code, kind = exitUsage, service.KindUsage
	} else if strings.HasPrefix(err.Error(), "unknown command ") {
		code, kind = exitUsage, service.KindUsage
	}
	if a.json || jsonRequested(args) {
		enc := json.NewEncoder(stderr)
		enc.Encode(service.ErrorJSON{Error: msg, Domain: a.domain, Kind: kind})
		return code
	}
	// Control characters an error may quote from the guest are escaped in
	// text (encoding/json escapes them in the JSON form).
	fmt.Fprintln(stderr, "hvpatch: "+service.EscapeControls(msg))
	if ue != nil {
		fmt.Fprint(stderr, "\n"+ue.usageText())
	}
	return code
}
