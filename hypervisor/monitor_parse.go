package hypervisor

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// ramPiece is a guest-physical RAM range and where it lives in QEMU's RAM
// block (the memory backend): Offset bytes into block Block.
type ramPiece struct {
	Region
	Block  string
	Offset uint64
}

// mtreeLine matches a flat-view entry such as
// "0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000".
var mtreeLine = regexp.MustCompile(`^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-f]+))?`)

// parseMtree extracts guest RAM from "info mtree -f": the flat view of the
// "memory" address space, entries of the machine's RAM block (the block that
// holds guest-physical 1 MiB; ram or rom mode, ROM mode only means the guest
// cannot write it). Device RAM (VGA, option ROMs, BIOS) is left out: it is
// not guest RAM. Adjacent pieces that are also adjacent in the block merge.
func parseMtree(text string) ([]ramPiece, error) {
	var pieces []ramPiece
	inView, found := false, false
	for _, line := range strings.Split(text, "\n") {
		switch {
		case strings.HasPrefix(line, "FlatView #"):
			if found && inView {
				inView = false
				goto done
			}
			inView = false
		case strings.TrimSpace(line) == `AS "memory", root: system`:
			inView, found = true, true
		case inView:
			m := mtreeLine.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			if m[3] != "ram" && m[3] != "rom" {
				continue
			}
			lo, err1 := strconv.ParseUint(m[1], 16, 64)
			hi, err2 := strconv.ParseUint(m[2], 16, 64)
			var off uint64
			var err3 error
			if m[5] != "" {
				off, err3 = strconv.ParseUint(m[5], 16, 64)
			}
			// The size, hi-lo+1, must not wrap to 0; neither may the
			// block offset of the last byte.
			if err1 != nil || err2 != nil || err3 != nil || hi < lo || hi-lo == 1<<64-1 || off+(hi-lo) < off {
				return nil, fmt.Errorf("bad range in line %q", line)
			}
			pieces = append(pieces, ramPiece{Region: Region{GPA: lo, Size: hi - lo + 1}, Block: m[4], Offset: off})
		}
	}
done:
	if !found {
		return nil, fmt.Errorf(`no flat view for address space "memory" in the output`)
	}
	// The main RAM block is the one mapped at 1 MiB (where every x86 kernel
	// is loaded); fall back to the largest block.
	main := ""
	sizes := map[string]uint64{}
	for _, p := range pieces {
		if p.GPA <= 1<<20 && 1<<20 < p.End() {
			main = p.Block
		}
		sizes[p.Block] += p.Size
	}
	if main == "" {
		for b, s := range sizes {
			if s > sizes[main] {
				main = b
			}
		}
	}
	if main == "" {
		return nil, fmt.Errorf("no RAM in the memory map")
	}
	var ram []ramPiece
	for _, p := range pieces {
		if p.Block != main {
			continue
		}
		if n := len(ram); n > 0 && ram[n-1].End() == p.GPA && ram[n-1].Offset+ram[n-1].Size == p.Offset {
			ram[n-1].Size += p.Size
			continue
		}
		ram = append(ram, p)
	}
	sort.Slice(ram, func(i, j int) bool { return ram[i].GPA < ram[j].GPA })
	for i := range ram {
		ram[i].Name = regionName(ram[i].Block, ram[i].GPA)
	}
	return ram, nil
}

// regionName is "pc.ram", or "pc.ram@4G" for a piece starting elsewhere.
func regionName(block string, gpa uint64) string {
	switch {
	case gpa == 0:
		return block
	case gpa%(1<<30) == 0:
		return fmt.Sprintf("%s@%dG", block, gpa>>30)
	default:
		return fmt.Sprintf("%s@%#x", block, gpa)
	}
}

// regField matches "KEY=value" in "info registers"; keys may be padded
// ("R8 =", "ES =") and some values follow blanks ("GDT=     fffffe...").
var regField = regexp.MustCompile(`([A-Z][A-Z0-9]*) ?=\s*([0-9a-f]+)(?: ([0-9a-f]+))?`)

// parseRegisters reads the per-CPU blocks of "info registers -a".
func parseRegisters(text string) ([]CPUState, error) {
	var cpus []CPUState
	var cur *CPUState
	seen := map[string]bool{}
	finish := func() error {
		if cur == nil {
			return nil
		}
		for _, k := range []string{"RIP", "RSP", "CR0", "CR3", "CR4", "EFER", "GDT", "IDT", "GS", "CPL"} {
			if !seen[k] {
				return fmt.Errorf("CPU#%d: no %s in the output", cur.Index, k)
			}
		}
		cpus = append(cpus, *cur)
		return nil
	}
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimRight(line, "\r ")
		if strings.HasPrefix(line, "CPU#") {
			if err := finish(); err != nil {
				return nil, err
			}
			f := strings.Fields(line[4:])
			if len(f) == 0 {
				return nil, fmt.Errorf("bad CPU header %q", line)
			}
			idx, err := strconv.Atoi(f[0])
			if err != nil {
				return nil, fmt.Errorf("bad CPU header %q", line)
			}
			cur, seen = &CPUState{Index: idx}, map[string]bool{}
			continue
		}
		if cur == nil {
			continue
		}
		for _, m := range regField.FindAllStringSubmatch(line, -1) {
			key := m[1]
			v, err := strconv.ParseUint(m[2], 16, 64)
			if err != nil {
				continue
			}
			// Segment and table registers: "GS =sel base limit flags",
			// "GDT=     base limit"; the base is the second number.
			second := func() (uint64, bool) {
				if m[3] == "" {
					return 0, false
				}
				b, err := strconv.ParseUint(m[3], 16, 64)
				return b, err == nil
			}
			switch key {
			case "RIP":
				cur.RIP = v
			case "RSP":
				cur.RSP = v
			case "CR0":
				cur.CR0 = v
			case "CR3":
				cur.CR3 = v
			case "CR4":
				cur.CR4 = v
			case "EFER":
				cur.EFER = v
			case "CPL":
				cur.CPL = int(v)
			case "GDT", "IDT":
				// "GDT=     base limit": the first number is the base.
				if key == "GDT" {
					cur.GDTBase = v
				} else {
					cur.IDTBase = v
				}
			case "GS":
				b, ok := second()
				if !ok {
					continue
				}
				cur.GSBase = b
			default:
				continue
			}
			seen[key] = true
		}
	}
	if err := finish(); err != nil {
		return nil, err
	}
	if len(cpus) == 0 {
		return nil, fmt.Errorf("no CPU#N blocks in the output")
	}
	return cpus, nil
}
