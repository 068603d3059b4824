package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/hvpatch/hvpatch/internal/buildinfo"
	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	"github.com/spf13/pflag"
)

// description is what hvpatchd --help and the man page say it does.
const description = `Keeps the patches of the patch directory applied to the guests they select,
and serves hvpatch's API. Flags override HVPATCHD_* environment variables,
which override the configuration file.`

// writeMan writes hvpatchd.8 into dir: the flags of fs (hidden ones left
// out) through cobra's man page generator (make install runs it).
func writeMan(fs *pflag.FlagSet, dir string) error {
	cmd := &cobra.Command{
		Use:   "hvpatchd [flags]",
		Short: "keep declared kernel patches applied to libvirt guests and serve hvpatch's API",
		Long: description + `

The configuration file (default /etc/hvpatch/hvpatchd.yaml) documents every
key. The API is HTTP/JSON on a unix socket (api.socket, default
/run/hvpatch/hvpatchd.sock), described in OpenAPI 3 at /openapi.json.
SIGTERM or SIGINT stop it once the operation in progress is done.`,
		Example: `  hvpatchd --config /etc/hvpatch/hvpatchd.yaml
  hvpatchd --api-socket /run/hvpatch/hvpatchd.sock --log-format json
  systemctl enable --now hvpatchd`,
		DisableAutoGenTag: true,
		Run:               func(*cobra.Command, []string) {},
	}
	cmd.Flags().AddFlagSet(fs)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "hvpatchd.8"))
	if err != nil {
		return err
	}
	header := &doc.GenManHeader{Section: "8", Source: "hvpatchd " + buildinfo.Read().String(), Manual: "hvpatch manual"}
	if err := doc.GenMan(cmd, header, f); err != nil {
		f.Close()
		return fmt.Errorf("man page: %w", err)
	}
	return f.Close()
}
