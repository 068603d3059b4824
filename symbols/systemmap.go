package symbols

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// LoadSystemMap reads a System.map (or a /proc/kallsyms text: a fourth
// "[module]" column is kept as the symbol's module) and moves addresses by
// slide, the KASLR offset. Absolute symbols (type A/a) and, when the map's
// per-CPU area starts at 0 (x86-64), the symbols in
// [__per_cpu_start, __per_cpu_end] are not moved: KASLR does not move them.
func LoadSystemMap(r io.Reader, slide uint64) (*Table, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	var syms []Symbol
	for line := 1; sc.Scan(); line++ {
		text := sc.Text()
		if strings.TrimSpace(text) == "" {
			continue
		}
		if strings.Contains(text, "The real System.map is in") {
			return nil, fmt.Errorf("symbols: System.map line %d: this is the distribution's placeholder (%q), not a symbol map", line, strings.TrimSpace(text))
		}
		f := strings.Fields(text)
		if len(f) < 3 || len(f) > 4 || len(f[1]) != 1 {
			return nil, fmt.Errorf("symbols: System.map line %d: want \"ADDRESS TYPE NAME [[MODULE]]\", got %q", line, text)
		}
		addr, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			return nil, fmt.Errorf("symbols: System.map line %d: address %q: %v", line, f[0], err)
		}
		s := Symbol{Name: f[2], Addr: addr, Type: f[1][0]}
		if len(f) == 4 {
			m := f[3]
			if len(m) < 3 || m[0] != '[' || m[len(m)-1] != ']' {
				return nil, fmt.Errorf("symbols: System.map line %d: module column %q is not [NAME]", line, m)
			}
			s.Module = m[1 : len(m)-1]
		}
		syms = append(syms, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("symbols: reading System.map: %w", err)
	}
	if len(syms) == 0 {
		return nil, fmt.Errorf("symbols: System.map holds no symbols")
	}
	if slide != 0 {
		var pcpuStart, pcpuEnd uint64
		haveStart, haveEnd := false, false
		for _, s := range syms {
			switch s.Name {
			case "__per_cpu_start":
				pcpuStart, haveStart = s.Addr, true
			case "__per_cpu_end":
				pcpuEnd, haveEnd = s.Addr, true
			}
		}
		zeroBasedPerCPU := haveStart && haveEnd && pcpuStart == 0
		for i := range syms {
			s := &syms[i]
			if s.Type == 'A' || s.Type == 'a' || zeroBasedPerCPU && s.Addr <= pcpuEnd && s.Module == "" {
				continue
			}
			s.Addr += slide
		}
	}
	return newTableOwned(syms), nil
}
