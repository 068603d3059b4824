package main

import (
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newMemCmd) }

// maxMemRead bounds one "mem read": the output is a hex dump.
const maxMemRead = service.MaxMemRead

func newMemCmd(a *app) *cobra.Command {
	mem := &cobra.Command{Use: "mem", Short: "Read guest memory"}
	var (
		phys    string
		backend string
		dump    string
		rawBase string
	)
	read := &cobra.Command{
		Use:   "read DOMAIN --phys ADDR LEN | read --dump FILE --phys ADDR LEN",
		Short: "Hex dump of guest-physical memory",
		Long: "Reads LEN bytes of guest-physical memory at ADDR from a running domain, or from an offline image:\n" +
			"an ELF core (virsh dump --memory-only) or, with --raw-base, a raw image loaded at that address.",
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if phys == "" {
				return usageErr(cmd, "--phys ADDR is required")
			}
			gpa, err := parseNum(phys)
			if err != nil {
				return fmt.Errorf("--phys %q: %w", phys, err)
			}
			var source string
			if dump == "" {
				if len(args) != 2 {
					return usageErr(cmd, "want hvpatch mem read DOMAIN --phys ADDR LEN, got %d argument(s)", len(args))
				}
				source, args = args[0], args[1:]
			} else {
				if len(args) != 1 {
					return usageErr(cmd, "want hvpatch mem read --dump FILE --phys ADDR LEN (no DOMAIN), got %d argument(s)", len(args))
				}
				source = dump
			}
			n, err := parseNum(args[0])
			if err != nil || n == 0 || n > maxMemRead {
				return fmt.Errorf("LEN %q: want a number of bytes from 1 to %d", args[0], maxMemRead)
			}
			if dump == "" && backend == "" {
				c, err := a.daemon()
				if err != nil {
					return err
				}
				if c != nil {
					var res service.Bytes
					q := url.Values{"phys": {fmt.Sprintf("%#x", gpa)}, "len": {fmt.Sprint(n)}}
					if err := c.get(cmd.Context(), domainPath(source, "mem"), q, &res); err != nil {
						return err
					}
					return a.out.Emit(res, res.WriteText)
				}
			}
			var m hypervisor.PhysMem
			switch {
			case dump != "" && rawBase != "":
				base, err := parseNum(rawBase)
				if err != nil {
					return fmt.Errorf("--raw-base %q: %w", rawBase, err)
				}
				m, err = hypervisor.OpenRaw(dump, base)
				if err != nil {
					return err
				}
			case dump != "":
				d, err := hypervisor.OpenELFDump(dump)
				if err != nil {
					return err
				}
				m = d
			default:
				d, err := a.Domain(cmd.Context(), source)
				if err != nil {
					return err
				}
				if m, err = d.OpenPhysMem(cmd.Context(), backend); err != nil {
					return err
				}
			}
			defer m.Close()
			res, err := service.MemRead(source, m, gpa, n)
			if err != nil {
				return err
			}
			return a.out.Emit(res, res.WriteText)
		},
	}
	f := read.Flags()
	f.StringVar(&phys, "phys", "", "guest-physical address (0x… for hex)")
	f.StringVar(&backend, "backend", "", "memfd, process, or empty for the best available")
	f.StringVar(&dump, "dump", "", "read an offline image instead of a running domain")
	f.StringVar(&rawBase, "raw-base", "", "the --dump file is a raw image starting at this guest-physical address")
	mem.AddCommand(read)
	return mem
}

// parseNum takes decimal or 0x-prefixed hex.
func parseNum(s string) (uint64, error) {
	return strconv.ParseUint(strings.ReplaceAll(s, "_", ""), 0, 64)
}

// hexDump prints 16 bytes a line: address, bytes, printable characters.
func hexDump(w io.Writer, addr uint64, b []byte) error { return service.HexDump(w, addr, b) }
