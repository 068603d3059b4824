package introspect

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

func TestDisassembleSpecialCases(t *testing.T) {
	code := []byte{
		0xf3, 0x0f, 0x1e, 0xfa, // endbr64
		0x0f, 0x1f, 0x44, 0x00, 0x00, // nopl 0x0(%rax,%rax,1): the fentry site
		0x0f, 0x01, 0xcb, // stac
		0x0f, 0x01, 0xca, // clac
		0xc5, 0xf9, 0xef, 0xc0, // vpxor %xmm0,%xmm0,%xmm0
		0xc4, 0xe3, 0x7d, 0x39, 0xc1, 0x01, // vextracti128 $1,%ymm0,%xmm1
		0x62, 0xf1, 0x7d, 0x48, 0xef, 0x44, 0x24, 0x01, // vpxord 0x40(%rsp),%zmm0,%zmm0
		0xf3, 0x0f, 0xc7, 0xf8, // rdpid %rax
		0xc5, 0xf8, 0x77, // vzeroupper
		0xc3, // ret
	}
	want := []struct {
		len  int
		text string
	}{{4, "endbr64"}, {5, "nop"}, {3, "stac"}, {3, "clac"}, {4, "vex"}, {6, "vex"}, {8, "vex"}, {4, "rdpid"}, {3, "vex"}, {1, "ret"}}
	insts, err := Disassemble(code, 0xffffffff81000000)
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != len(want) {
		t.Fatalf("got %d instructions, want %d: %+v", len(insts), len(want), insts)
	}
	addr := uint64(0xffffffff81000000)
	for i, w := range want {
		in := insts[i]
		if in.Len != w.len || in.Addr != addr || !strings.Contains(in.Text, w.text) {
			t.Errorf("inst %d = %+v, want len %d containing %q at %#x", i, in, w.len, w.text, addr)
		}
		addr += uint64(in.Len)
	}
	if n, err := InstructionAt([]byte{0xf3, 0x0f, 0x1e, 0xfa, 0x90}); n != 4 || err != nil {
		t.Errorf("InstructionAt(endbr64) = %d, %v", n, err)
	}
	if _, err := InstructionAt(nil); err == nil {
		t.Error("InstructionAt(nil) succeeded")
	}
	if _, err := Disassemble([]byte{0x0f, 0x1f}, 0x1000); err == nil || !strings.Contains(err.Error(), "0x1000") {
		t.Errorf("truncated instruction: err = %v, want one naming the address", err)
	}
}

// TestDisassembleMatchesObjdump decodes windows of the guest kernels' text
// with both Disassemble and GNU objdump and requires the same instruction
// boundaries everywhere.
func TestDisassembleMatchesObjdump(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the guest kernels and objdump")
	}
	if _, err := exec.LookPath("objdump"); err != nil {
		t.Fatalf("objdump (binutils) is needed: %v", err)
	}
	kernels, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range uniqueSeries(kernels) {
		t.Run(k.Series, func(t *testing.T) {
			f, err := elf.Open(k.Vmlinux())
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			text := f.Section(".text")
			if text == nil {
				t.Fatalf("%s has no .text", k.Vmlinux())
			}
			data, err := text.Data()
			if err != nil {
				t.Fatal(err)
			}
			// In the file, the fentry sites are still "call __fentry__";
			// the kernel turns them into NOPs at boot.
			entry := []byte{0xe8}
			if k.Series != "6.1" {
				entry = []byte{0xf3, 0x0f, 0x1e, 0xfa, 0xe8}
			}
			total, vexCount := 0, 0
			starts := []int{}
			for _, frac := range []float64{0.05, 0.25, 0.45, 0.65} {
				starts = append(starts, int(float64(len(data))*frac))
			}
			// And one window over AVX code (VEX prefixes), which x86asm
			// cannot decode at all: the crypto and RAID routines have it.
			vex := bytes.Index(data, []byte{0xc5, 0xf9, 0xef}) // vpxor
			if vex < 0 {
				t.Fatalf("no vpxor in %s .text to test VEX decoding on", k.Release)
			}
			starts = append(starts, max(0, vex-16<<10))
			for _, off := range starts {
				frac := float64(off) / float64(len(data))
				// Start at a function entry (16-byte aligned fentry site) so
				// both decoders begin on a real boundary.
				for off < len(data) && (off%16 != 0 || !bytes.HasPrefix(data[off:], entry)) {
					off++
				}
				if off+96<<10 > len(data) {
					t.Fatalf("no function entry found in .text after %.0f%%", frac*100)
				}
				end := off + 96<<10
				start := text.Addr + uint64(off)
				// Decode past the end so the last instruction is whole, then cut.
				ours, err := Disassemble(data[off:end+15], start)
				for len(ours) > 0 && ours[len(ours)-1].Addr >= text.Addr+uint64(end) {
					ours, err = ours[:len(ours)-1], nil
				}
				if err != nil && ours[len(ours)-1].Addr+uint64(ours[len(ours)-1].Len) < text.Addr+uint64(end) {
					t.Fatalf("Disassemble: %v", err)
				}
				theirs := objdumpBoundaries(t, k.Vmlinux(), start, text.Addr+uint64(end)+16)
				for len(theirs) > 0 && theirs[len(theirs)-1].addr >= text.Addr+uint64(end) {
					theirs = theirs[:len(theirs)-1]
				}
				n := min(len(ours), len(theirs))
				for i := 0; i < n; i++ {
					if ours[i].Addr != theirs[i].addr || ours[i].Len != theirs[i].len {
						t.Fatalf("window at %#x, instruction %d: ours %#x len %d (%s), objdump %#x len %d (%s)",
							start, i, ours[i].Addr, ours[i].Len, ours[i].Text, theirs[i].addr, theirs[i].len, theirs[i].text)
					}
				}
				if len(ours) != len(theirs) {
					t.Fatalf("window at %#x: we decoded %d instructions, objdump %d", start, len(ours), len(theirs))
				}
				total += n
				for _, in := range ours {
					if in.Text == "(vex/evex)" {
						vexCount++
					}
				}
			}
			if vexCount == 0 {
				t.Errorf("no VEX instruction was compared")
			}
			t.Logf("%s: %d instructions (%d VEX), boundaries identical to objdump", k.Release, total, vexCount)
		})
	}
}

type objdumpInst struct {
	addr uint64
	len  int
	text string
}

func objdumpBoundaries(t *testing.T, vmlinux string, start, stop uint64) []objdumpInst {
	t.Helper()
	out, err := exec.Command("objdump", "-d", "--insn-width=16", "--no-show-raw-insn=false",
		fmt.Sprintf("--start-address=%#x", start), fmt.Sprintf("--stop-address=%#x", stop), vmlinux).Output()
	if err != nil {
		out, err = exec.Command("objdump", "-d", "--insn-width=16",
			fmt.Sprintf("--start-address=%#x", start), fmt.Sprintf("--stop-address=%#x", stop), vmlinux).Output()
	}
	if err != nil {
		t.Fatalf("objdump: %v", err)
	}
	var insts []objdumpInst
	for _, line := range strings.Split(string(out), "\n") {
		// "ffffffff81000000:\t0f 1f 44 00 00 \tnopl   0x0(%rax,%rax,1)"
		parts := strings.Split(line, "\t")
		if len(parts) < 3 || !strings.HasSuffix(parts[0], ":") {
			continue
		}
		addr, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(parts[0], ":")), 16, 64)
		if err != nil {
			continue
		}
		insts = append(insts, objdumpInst{addr, len(strings.Fields(parts[1])), strings.Join(parts[2:], " ")})
	}
	if len(insts) == 0 {
		t.Fatalf("objdump printed no instructions for %#x-%#x", start, stop)
	}
	return insts
}

// TestDisassembleStyle: immediates print unsigned in their operand size
// (kernel addresses as objdump and crash print them, never negative), one
// mnemonic style (call/ret/jmp without suffix), and branch and RIP-relative
// targets are decoded for symbolization.
func TestDisassembleStyle(t *testing.T) {
	const pc = 0xffffffff81000000
	for _, c := range []struct {
		code   []byte
		text   string
		target uint64
		kind   TargetKind
	}{
		{[]byte{0x48, 0xc7, 0xc7, 0x00, 0x00, 0x00, 0x82}, "mov $0xffffffff82000000,%rdi", 0, NoTarget},
		{[]byte{0x83, 0xe4, 0xf0}, "and $0xfffffff0,%esp", 0, NoTarget},
		{[]byte{0x48, 0x83, 0xe4, 0xf0}, "and $0xfffffffffffffff0,%rsp", 0, NoTarget},
		{[]byte{0x80, 0x38, 0xff}, "cmpb $0xff,(%rax)", 0, NoTarget},
		{[]byte{0x3c, 0xff}, "cmp $0xff,%al", 0, NoTarget},
		{[]byte{0xe8, 0x0b, 0x00, 0x00, 0x00}, "call 0xffffffff81000010", pc + 0x10, Branch},
		{[]byte{0xe9, 0xfb, 0xff, 0xff, 0xff}, "jmp 0xffffffff81000000", pc, Branch},
		{[]byte{0x74, 0x02}, "je 0xffffffff81000004", pc + 4, Branch},
		{[]byte{0xc3}, "ret", 0, NoTarget},
		{[]byte{0x48, 0x8b, 0x05, 0xf9, 0xff, 0xff, 0x00}, "mov 0xfffff9(%rip),%rax", pc + 7 + 0xfffff9, Mem},
		{[]byte{0xff, 0xe0}, "jmp *%rax", 0, NoTarget},
	} {
		insts, err := Disassemble(c.code, pc)
		if err != nil || len(insts) != 1 {
			t.Fatalf("% x: %v %+v", c.code, err, insts)
		}
		in := insts[0]
		if in.Text != c.text || in.Target != c.target || in.Kind != c.kind {
			t.Errorf("% x: %q target %#x kind %d; want %q %#x %d", c.code, in.Text, in.Target, in.Kind, c.text, c.target, c.kind)
		}
	}
}
