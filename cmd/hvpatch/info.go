package main

import (
	"fmt"
	"strings"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/service"
	"github.com/spf13/cobra"
)

func init() { addCommand(newInfoCmd) }

// kernelSource is how the introspection commands (info, sym, syms, read,
// ps, lsmod) reach a guest kernel: a running domain, or --dump FILE.
type kernelSource struct {
	dump    string
	backend string
	cmd     *cobra.Command
}

func (s *kernelSource) flags(cmd *cobra.Command) {
	s.cmd = cmd
	cmd.Flags().StringVar(&s.dump, "dump", "", "read an ELF memory dump (virsh dump --memory-only) instead of a running domain")
	cmd.Flags().StringVar(&s.backend, "backend", "", "guest memory access for running domains: memfd, process, or empty for the best available")
}

// split separates the DOMAIN argument (absent with --dump) from the rest.
// want is the number of arguments after DOMAIN.
func (s *kernelSource) split(args []string, want int, usage string) (string, []string, error) {
	if s.dump != "" {
		if len(args) != want {
			return "", nil, usageErr(s.cmd, "with --dump FILE, no DOMAIN: want hvpatch %s, got %d argument(s)", strings.Replace(usage, "DOMAIN", "--dump FILE", 1), len(args))
		}
		return s.dump, args, nil
	}
	if len(args) == 0 {
		return "", nil, usageErr(s.cmd, "no DOMAIN: want hvpatch %s, or --dump FILE (a virsh dump --memory-only file) instead of DOMAIN", usage)
	}
	if len(args) != want+1 {
		return "", nil, usageErr(s.cmd, "want hvpatch %s (or --dump FILE instead of DOMAIN), got %d argument(s)", usage, len(args))
	}
	return args[0], args[1:], nil
}

// open attaches to the kernel of the domain or dump named by source. The
// returned close releases guest memory.
func (s *kernelSource) open(cmd *cobra.Command, a *app, source string) (*introspect.Kernel, func(), error) {
	ctx := cmd.Context()
	var mem hypervisor.PhysMem
	var cpus []hypervisor.CPUState
	if s.dump != "" {
		d, err := hypervisor.OpenELFDump(s.dump)
		if err != nil {
			return nil, nil, err
		}
		mem, cpus = d, d.CPUs()
	} else {
		dom, err := a.Domain(ctx, source)
		if err != nil {
			return nil, nil, err
		}
		if cpus, err = dom.CPUs(ctx); err != nil {
			return nil, nil, err
		}
		if mem, err = dom.OpenPhysMem(ctx, s.backend); err != nil {
			return nil, nil, err
		}
	}
	k, err := introspect.Open(ctx, mem, cpus)
	if err != nil {
		mem.Close()
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}
	return k, func() { mem.Close() }, nil
}

// infoResult is the JSON of "info" (tests decode it).
type infoResult = service.Info

func newInfoCmd(a *app) *cobra.Command {
	var src kernelSource
	cmd := &cobra.Command{
		Use:   "info DOMAIN | info --dump FILE",
		Short: "Show the guest kernel: release, KASLR slide, paging, symbols, BTF",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			source, _, err := src.split(args, 0, "info DOMAIN")
			if err != nil {
				return err
			}
			res, err := kernelQuery(cmd, a, &src, source, "info", nil, func(k *introspect.Kernel) (service.Info, error) {
				return service.KernelInfo(source, k), nil
			})
			if err != nil {
				return err
			}
			return a.out.Emit(res, res.WriteText)
		},
	}
	src.flags(cmd)
	return cmd
}
