package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/fixbuild"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/spf13/cobra"
)

func init() { addCommand(newBuildCmd) }

func newBuildCmd(a *app) *cobra.Command {
	var src kernelSource
	var opt fixbuild.Options
	cmd := &cobra.Command{
		Use:   "build DOMAIN FIX.diff | build --dump FILE FIX.diff",
		Short: "Build a hot patch from a kernel source fix for the exact kernel a guest runs",
		Long: `Build turns a source fix (a unified diff, as git format-patch or diff -u writes it)
into a patch bundle for the kernel build the guest runs. For Debian kernels it finds
the build from the guest's banner, fetches that build's source, headers and kbuild
packages (cached under --cache), compiles each changed .c file as the kernel was
compiled, checks every function against the guest's own bytes, and keeps the
functions the fix changes. The bundle (DIR/ID/ID.yaml and its objects) is applied
with hvpatch apply. The last line printed is the patch file's path.

Refused, with the reason: header, assembly and build-file changes, changed struct
layouts or initial values of existing data, __init code, functions without an
fentry site, and a source tree that is not the guest's build.`,
		Example: `  hvpatch build web01 CVE-2026-1234.diff -o /var/lib/hvpatch/bundles
  hvpatch apply web01 /var/lib/hvpatch/bundles/cve-2026-1234/cve-2026-1234.yaml
  hvpatch build --dump web01.core fix.diff --json`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, rest, err := src.split(args, 1, "build DOMAIN FIX.diff")
			if err != nil {
				return err
			}
			diffPath := rest[0]
			diff, err := os.ReadFile(diffPath)
			if err != nil {
				return err
			}
			if len(diff) > 16<<20 {
				return fmt.Errorf("%s: %d bytes is not a source fix", diffPath, len(diff))
			}
			opt.DiffName = diffPath
			if opt.Progress == nil {
				errw := cmd.ErrOrStderr()
				opt.Progress = func(msg string) { fmt.Fprintf(errw, "hvpatch build: %s\n", msg) }
			}
			k, closeFn, err := src.open(cmd, a, source)
			if err != nil {
				return err
			}
			g := fixbuild.Guest{Banner: k.Banner, Release: k.Release, Symbols: k.Symbols, Read: k.AS.ReadVirt, ModuleSymbols: k.ModuleSymbols}
			g.BuildID, err = patcher.BuildID(patcher.KernelTarget{K: k})
			if err != nil {
				closeFn()
				return err
			}
			res, err := fixbuild.Build(cmd.Context(), g, diff, opt)
			closeFn()
			if err != nil {
				var r *fixbuild.RefusedError
				if errors.As(err, &r) {
					return fmt.Errorf("%s: %s: fix refused, nothing written: %w", source, diffPath, err)
				}
				return fmt.Errorf("%s: %s: %w", source, diffPath, err)
			}
			return a.out.Emit(res, func(w io.Writer) error { return writeBuild(w, res) })
		},
	}
	src.flags(cmd)
	cmd.Flags().StringVarP(&opt.OutDir, "output", "o", ".", "directory the bundle is written under (as DIR/ID/)")
	cmd.Flags().StringVar(&opt.ID, "id", "", "patch id (default: from the diff's file name)")
	cmd.Flags().StringVar(&opt.Source, "source", "", "a prepared kernel tree (.config, make prepare done) instead of Debian's packages")
	cmd.Flags().StringVar(&opt.Cache, "cache", "", "cache of prepared Debian kernel trees (default $HVPATCH_BUILD_CACHE or /var/cache/hvpatch/ksource)")
	return cmd
}

func writeBuild(w io.Writer, r *fixbuild.Result) error {
	fmt.Fprintf(w, "Patch:     %s for %s", r.ID, r.Release)
	if r.Source != "" {
		fmt.Fprintf(w, " (Debian source %s)", r.Source)
	}
	fmt.Fprintln(w)
	if len(r.Packages) > 0 {
		fmt.Fprintf(w, "Packages:  %s\n", strings.Join(r.Packages, ", "))
	}
	rows := [][]string{}
	for _, f := range r.Functions {
		pos := ""
		if f.Sympos > 0 {
			pos = fmt.Sprint(f.Sympos)
		}
		addr := ""
		if f.Addr != 0 {
			addr = fmt.Sprintf("%#x", f.Addr)
		}
		rows = append(rows, []string{f.Name, f.Kind, f.File, pos, addr})
	}
	fmt.Fprintln(w)
	if err := Table(w, []string{"function", "kind", "file", "sympos", "guest address"}, rows); err != nil {
		return err
	}
	if len(r.LineOnly) > 0 {
		fmt.Fprintf(w, "\nUnchanged but for __LINE__: %s\n", strings.Join(r.LineOnly, ", "))
	}
	if len(r.Notes) > 0 {
		fmt.Fprintln(w, "\nNotes:")
		for _, n := range r.Notes {
			fmt.Fprintf(w, "  %s\n", n)
		}
	}
	fmt.Fprintln(w, "\nSteps:")
	srows := [][]string{}
	for _, s := range r.Steps {
		d := s.Duration.Round(time.Millisecond).String()
		if s.Cached {
			d = "cached"
		}
		srows = append(srows, []string{s.Name, d, s.Detail})
	}
	if err := Table(w, []string{"step", "time", "detail"}, srows); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nTotal %v. Objects: %s\n", r.Total.Round(time.Millisecond), strings.Join(r.Objects, ", "))
	_, err := fmt.Fprintln(w, r.PatchFile)
	return err
}
