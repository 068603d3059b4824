package codearea

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/linker"
)

// guestState fills the linker options that depend on the guest's state at
// link time: static keys (struct static_key.enabled, an atomic_t at offset
// 0) and CPU features (boot_cpu_data.x86_capability, feature words then
// bug words), and the alternatives entry layout (sizeof(struct alt_instr)
// from BTF when the guest has it).
func guestState(k *introspect.Kernel, opt *linker.Options) {
	opt.KeyEnabled = func(keyAddr uint64) (bool, error) {
		var b [4]byte
		if err := k.AS.ReadVirt(keyAddr, b[:]); err != nil {
			return false, fmt.Errorf("codearea: reading static_key.enabled at %#x: %w", keyAddr, err)
		}
		return int32(binary.LittleEndian.Uint32(b[:])) > 0, nil // static_key_enabled()
	}
	var (
		once sync.Once
		caps []byte
		cerr error
	)
	opt.CPUFeature = func(bit uint16) (bool, error) {
		once.Do(func() { caps, cerr = readCapabilities(k) })
		if cerr != nil {
			return false, cerr
		}
		if int(bit)/8 >= len(caps) {
			return false, fmt.Errorf("codearea: CPU feature bit %d is beyond boot_cpu_data.x86_capability (%d words)", bit, len(caps)/4)
		}
		// u32 words, little-endian: bit n is bit n%8 of byte n/8.
		return caps[bit/8]&(1<<(bit%8)) != 0, nil
	}
	if k.BTF != nil {
		if n, err := introspect.SizeOf(k.BTF, "alt_instr"); err == nil && (n == linker.AltLayout61 || n == linker.AltLayout612) {
			opt.AltLayout = int(n)
		}
	}
}

// readCapabilities reads boot_cpu_data.x86_capability[] (NCAPINTS feature
// words followed by NBUGINTS bug words) from guest memory.
func readCapabilities(k *introspect.Kernel) ([]byte, error) {
	base, err := k.Symbols.Addr("boot_cpu_data")
	if err != nil {
		return nil, fmt.Errorf("codearea: CPU features: %w", err)
	}
	f, err := introspect.FieldOf(k.BTF, "cpuinfo_x86.x86_capability")
	if err != nil {
		return nil, fmt.Errorf("codearea: CPU features: %w", err)
	}
	if f.Size == 0 || f.Size > 1024 {
		return nil, fmt.Errorf("codearea: CPU features: x86_capability size %d is implausible", f.Size)
	}
	caps := make([]byte, f.Size)
	if err := k.AS.ReadVirt(base+f.Offset, caps); err != nil {
		return nil, fmt.Errorf("codearea: reading boot_cpu_data.x86_capability at %#x: %w", base+f.Offset, err)
	}
	return caps, nil
}

// resolveNth resolves "NAME,N" (N ≥ 1) to the N-th symbol called NAME in
// the guest's kallsyms address order: a static function or variable whose
// name several files use. ok is false for any other spelling.
func resolveNth(k *introspect.Kernel, name string) (addr uint64, ok bool) {
	base, n := splitNth(name)
	if n == 0 {
		return 0, false
	}
	syms := k.Symbols.Lookup(base)
	if n > len(syms) {
		return 0, false
	}
	return syms[n-1].Addr, true
}

// splitNth splits "NAME,N" (N ≥ 1) into NAME and N; any other spelling
// is the whole name and 0.
func splitNth(name string) (string, int) {
	i := strings.LastIndexByte(name, ',')
	if i <= 0 || i+1 >= len(name) || name[i+1] == '+' {
		return name, 0
	}
	n, err := strconv.Atoi(name[i+1:])
	if err != nil || n < 1 {
		return name, 0
	}
	return name[:i], n
}
