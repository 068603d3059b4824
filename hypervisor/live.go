package hypervisor

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// liveRAM is a RAM piece of a running guest with its address in the QEMU
// process.
type liveRAM struct {
	ramPiece
	HVA uint64
}

var gpa2hvaLine = regexp.MustCompile(`is (0x[0-9a-f]+)`)

// liveLayout gathers QEMU's pid, the guest RAM map and each piece's host
// virtual address (HMP gpa2hva, checked for consistency with the block
// offsets: a block is one contiguous host mapping).
func (d *Domain) liveLayout(ctx context.Context) (int, []liveRAM, error) {
	pid, err := d.QEMUPid(ctx)
	if err != nil {
		return 0, nil, err
	}
	ram, err := d.ramLayout(ctx)
	if err != nil {
		return 0, nil, err
	}
	live := make([]liveRAM, len(ram))
	for i, r := range ram {
		out, err := d.HMP(ctx, fmt.Sprintf("gpa2hva %#x", r.GPA))
		if err != nil {
			return 0, nil, err
		}
		m := gpa2hvaLine.FindStringSubmatch(out)
		if m == nil {
			return 0, nil, fmt.Errorf("domain %s: gpa2hva %#x answered %q", d.Name(), r.GPA, strings.TrimSpace(out))
		}
		hva, _ := strconv.ParseUint(m[1], 0, 64)
		live[i] = liveRAM{ramPiece: r, HVA: hva}
		if i > 0 && live[0].Block == r.Block && hva-r.Offset != live[0].HVA-live[0].Offset {
			return 0, nil, fmt.Errorf("domain %s: RAM block %s is not one host mapping (%#x→%#x, %#x→%#x)",
				d.Name(), r.Block, live[0].GPA, live[0].HVA, r.GPA, hva)
		}
	}
	return pid, live, nil
}

func regionsOf(live []liveRAM) []Region {
	regs := make([]Region, len(live))
	for i, r := range live {
		regs[i] = r.Region
	}
	return regs
}

// mapping is one line of /proc/PID/maps.
type mapping struct {
	Start, End, Offset uint64
	Inode              uint64
	Path               string
}

func procMaps(pid int) ([]mapping, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var maps []mapping
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 {
			continue
		}
		var m mapping
		se := strings.SplitN(fs[0], "-", 2)
		if len(se) != 2 {
			continue
		}
		m.Start, _ = strconv.ParseUint(se[0], 16, 64)
		m.End, _ = strconv.ParseUint(se[1], 16, 64)
		m.Offset, _ = strconv.ParseUint(fs[2], 16, 64)
		m.Inode, _ = strconv.ParseUint(fs[4], 10, 64)
		if len(fs) > 5 {
			m.Path = strings.Join(fs[5:], " ")
		}
		maps = append(maps, m)
	}
	return maps, sc.Err()
}

// OpenPhysMem opens guest-physical memory of the running domain. backend is
// "memfd" (QEMU's RAM file mapped here, zero copy), "process"
// (process_vm_readv/writev, any RAM backing) or "" for the best that works.
func (d *Domain) OpenPhysMem(ctx context.Context, backend string) (PhysMem, error) {
	switch backend {
	case "memfd":
		return d.openMemfd(ctx)
	case "process":
		return d.openProcess(ctx)
	case "":
		m, err := d.openMemfd(ctx)
		if err == nil {
			return m, nil
		}
		p, perr := d.openProcess(ctx)
		if perr != nil {
			return nil, fmt.Errorf("%v; and %v", err, perr)
		}
		return p, nil
	default:
		return nil, fmt.Errorf("unknown guest memory backend %q (want memfd, process or empty)", backend)
	}
}
