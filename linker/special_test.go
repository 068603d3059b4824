package linker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// Objects built by kbuild itself from testdata/kernelobj/*.c against the
// Debian 6.1 and 6.12 headers (see testdata/kernelobj/README): real
// __jump_table, .altinstructions, __bug_table and __ex_table entries, as
// objtool leaves them.

// The offsets of each site in its function, per kernel: 6.12 functions start
// with endbr64 (4 bytes), so everything is 4 bytes later.
type kernelObjSites struct {
	version string
	layout  int
	sites   map[string]uint64 // "fn" -> offset of the special site in fn
}

var kernelObjs = []kernelObjSites{
	{"61", AltLayout61, map[string]uint64{
		"hvpt_branch_unlikely": 0x5, "hvpt_branch_likely": 0x7, "hvpt_branch_far": 0x5,
		"hvpt_alt": 0x5, "hvpt_cpu_has": 0x7, "hvpt_warn": 0x17, "hvpt_bug": 0x17,
	}},
	{"612", AltLayout612, map[string]uint64{
		"hvpt_branch_unlikely": 0x9, "hvpt_branch_likely": 0xb, "hvpt_branch_far": 0x9,
		"hvpt_alt": 0x9, "hvpt_cpu_has": 0xb, "hvpt_warn": 0x1b, "hvpt_bug": 0x1b,
	}},
}

var kernelObjKallsyms = map[string]uint64{
	"__fentry__":         0xffffffffbbc01000,
	"__x86_return_thunk": 0xffffffffbcc05f00,
	"hvpt_counter":       0xffffffffbd900010,
	"hvpt_sink":          0xffffffffbd900020,
	"hvpt_key_off":       0xffffffffbd900040,
	"hvpt_key_on":        0xffffffffbd900060,
	"boot_cpu_data":      0xffffffffbd800000,
}

const (
	featLfenceRdtsc61  = 3*32 + 18
	featLfenceRdtsc612 = 20*32 + 2
	featAlways         = 3*32 + 21
	featHypervisor     = 4*32 + 31
)

type guestState struct {
	keys     map[string]bool // key symbol -> enabled
	features map[uint16]bool
}

func (g guestState) options(layout int) Options {
	return Options{
		AltLayout: layout,
		KeyEnabled: func(addr uint64) (bool, error) {
			for name, on := range g.keys {
				if kernelObjKallsyms[name] == addr {
					return on, nil
				}
			}
			return false, fmt.Errorf("no key at %#x", addr)
		},
		CPUFeature: func(bit uint16) (bool, error) { return g.features[bit], nil },
	}
}

func kernelObjResolver(name string) (uint64, bool) {
	a, ok := kernelObjKallsyms[name]
	return a, ok
}

func linkKernelObj(t *testing.T, version string, g guestState, layout int) *Image {
	t.Helper()
	obj := mustLoad(t, filepath.Join("testdata", "kernelobj", "hvpt_special_"+version+".o"))
	lay := Layout{TextBase: testTextBase, DataBase: testDataBase, TextLimit: pageSize, DataLimit: pageSize}
	img, err := obj.LinkWithOptions("hvpt_warn", lay, kernelObjResolver, g.options(layout))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// at returns n bytes of the linked text at fn+off.
func at(t *testing.T, img *Image, fn string, off uint64, n int) []byte {
	t.Helper()
	for _, s := range img.Map.Symbols {
		if s.Name == fn {
			a := s.Addr + off - img.Map.TextBase
			return img.Text[a : a+uint64(n)]
		}
	}
	t.Fatalf("%s not in the link map", fn)
	return nil
}

func jmp32(rel int32) []byte {
	b := []byte{0xe9, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(b[1:], uint32(rel))
	return b
}

func TestKernelObjectSpecialSections(t *testing.T) {
	nop2 := []byte{0x66, 0x90}
	nop3 := []byte{0x0f, 0x1f, 0x00}
	nop5 := []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
	lfence := []byte{0x0f, 0xae, 0xe8}
	for _, k := range kernelObjs {
		lfenceBit := uint16(featLfenceRdtsc61)
		if k.version == "612" {
			lfenceBit = featLfenceRdtsc612
		}
		cases := []struct {
			name  string
			state guestState
			want  map[string][]byte
		}{
			{"keys at default, features off",
				guestState{keys: map[string]bool{"hvpt_key_off": false, "hvpt_key_on": true},
					features: map[uint16]bool{featAlways: true}},
				map[string][]byte{
					"hvpt_branch_unlikely": nop2, "hvpt_branch_likely": nop2, "hvpt_branch_far": nop5,
					"hvpt_alt": nop3, "hvpt_cpu_has": jmp32(8), "hvpt_warn": nop2, "hvpt_bug": {0x0f, 0x0b},
				}},
			{"keys flipped, features on",
				guestState{keys: map[string]bool{"hvpt_key_off": true, "hvpt_key_on": false},
					features: map[uint16]bool{featAlways: true, lfenceBit: true, featHypervisor: true}},
				map[string][]byte{
					"hvpt_branch_unlikely": {0xeb, 0x08}, "hvpt_branch_likely": {0xeb, 0x08}, "hvpt_branch_far": jmp32(0xcf),
					"hvpt_alt": lfence, "hvpt_cpu_has": nop5, "hvpt_warn": nop2, "hvpt_bug": {0x0f, 0x0b},
				}},
		}
		for _, layout := range []int{k.layout, AltLayoutAuto} {
			for _, c := range cases {
				t.Run(fmt.Sprintf("%s/layout%d/%s", k.version, layout, c.name), func(t *testing.T) {
					img := linkKernelObj(t, k.version, c.state, layout)
					for fn, want := range c.want {
						if got := at(t, img, fn, k.sites[fn], len(want)); !bytes.Equal(got, want) {
							t.Errorf("%s+%#x: % x, want % x", fn, k.sites[fn], got, want)
						}
					}
					if len(img.Map.JumpLabels) != 3 || len(img.Map.Alternatives) != 3 || len(img.Map.Bugs) != 2 {
						t.Errorf("map has %d jump labels, %d alternatives, %d bugs; want 3, 3, 2",
							len(img.Map.JumpLabels), len(img.Map.Alternatives), len(img.Map.Bugs))
					}
					for _, j := range img.Map.JumpLabels {
						if j.Enabled != c.state.keys[j.Key] || j.KeyAddr != kernelObjKallsyms[j.Key] {
							t.Errorf("jump label %+v: key state or address wrong", j)
						}
					}
					var out strings.Builder
					img.Map.Format(&out)
					for _, s := range []string{"WARN at hvpt_warn+", "silenced: the guest cannot report it",
						"a later flip of those keys in the guest does not reach the code area", "jump labels", "alternatives:"} {
						if !strings.Contains(out.String(), s) {
							t.Errorf("link map lacks %q:\n%s", s, out.String())
						}
					}
					for _, ig := range []string{".return_sites", ".orc_unwind", ".orc_unwind_ip", "__mcount_loc"} {
						found := false
						for _, s := range img.Map.Ignored {
							found = found || s.Name == ig
						}
						if !found {
							t.Errorf("%s not listed as ignored: %v", ig, img.Map.Ignored)
						}
					}
				})
			}
		}
	}
}

// The alternative of static_cpu_has copies a jmp from .altinstr_replacement
// to the function: its rel32 must reach the same target from there.
func TestAlternativeJumpRerelativised(t *testing.T) {
	img := linkKernelObj(t, "61", guestState{keys: map[string]bool{"hvpt_key_off": false, "hvpt_key_on": true},
		features: map[uint16]bool{featAlways: true}}, AltLayoutAuto)
	site := at(t, img, "hvpt_cpu_has", 7, 5)
	var fn uint64
	for _, s := range img.Map.Symbols {
		if s.Name == "hvpt_cpu_has" {
			fn = s.Addr
		}
	}
	target := fn + 7 + 5 + uint64(int64(int32(binary.LittleEndian.Uint32(site[1:]))))
	if target != fn+0x14 {
		t.Errorf("jmp at hvpt_cpu_has+7 goes to %#x, want hvpt_cpu_has+0x14 = %#x", target, fn+0x14)
	}
}

func TestKernelObjectNeedsGuestState(t *testing.T) {
	obj := mustLoad(t, filepath.Join("testdata", "kernelobj", "hvpt_special_612.o"))
	_, err := obj.LinkWithOptions("hvpt_warn", testLayout, kernelObjResolver, Options{})
	var se *SpecialError
	if !errors.As(err, &se) || !strings.Contains(err.Error(), "Options.KeyEnabled is not set") || !strings.Contains(err.Error(), "Options.CPUFeature is not set") {
		t.Fatalf("link without callbacks: %v, want both callbacks asked for", err)
	}
	// A guest-memory read failing names the key and the site.
	opt := guestState{features: map[uint16]bool{}}.options(AltLayoutAuto)
	_, err = obj.LinkWithOptions("hvpt_warn", testLayout, kernelObjResolver, opt)
	if err == nil || !strings.Contains(err.Error(), "__jump_table entry for hvpt_branch_unlikely+0x9: static key hvpt_key_off") {
		t.Fatalf("link with a failing KeyEnabled: %v", err)
	}
}

func TestExTableRefusedWithFunction(t *testing.T) {
	for _, v := range []string{"61", "612"} {
		_, err := Load(filepath.Join("testdata", "kernelobj", "hvpt_uaccess_"+v+".o"))
		var se *SectionError
		if !errors.As(err, &se) || se.Section != "__ex_table" {
			t.Fatalf("%s: Load error %v, want __ex_table refused", v, err)
		}
		if !strings.Contains(err.Error(), "user-memory access with fault fixup at hvpt_getuser+0x") ||
			!strings.Contains(err.Error(), "the guest's exception table does not cover the code area") {
			t.Errorf("%s: error %q does not name the function and the reason", v, err)
		}
	}
}

// Entries the linker cannot honour are refused naming the site.
func TestAlternativeFlagsRefused(t *testing.T) {
	obj := mustLoad(t, filepath.Join("testdata", "kernelobj", "hvpt_special_612.o"))
	sp := obj.special[secAltInstr]
	orig := append([]byte(nil), sp.data...)
	defer copy(sp.data, orig)
	for _, c := range []struct {
		flags uint16
		want  string
	}{
		{altFlagDirectCall, "ALT_FLAG_DIRECT_CALL"},
		{1 << 5, "unknown alternative flags 0x20"},
	} {
		copy(sp.data, orig)
		binary.LittleEndian.PutUint16(sp.data[10:], c.flags)
		_, err := obj.LinkWithOptions("hvpt_warn", testLayout, kernelObjResolver,
			guestState{keys: map[string]bool{"hvpt_key_off": false, "hvpt_key_on": true}}.options(AltLayoutAuto))
		if err == nil || !strings.Contains(err.Error(), ".altinstructions entry for hvpt_alt+0x9: "+c.want) {
			t.Errorf("flags %#x: %v, want %q naming hvpt_alt+0x9", c.flags, err, c.want)
		}
	}
}

// Sections a code area does without are listed, not refused; symbols only
// they use need not resolve.
func TestKernelListsIgnored(t *testing.T) {
	src := `extern void __SCT__foo(void);
void f(void) {
	asm volatile("1: call __SCT__foo\n"
	    ".pushsection .static_call_sites,\"a\"\n.long 1b - .\n.long __SCK__foo - .\n.popsection\n"
	    ".pushsection .smp_locks,\"a\"\n.long 1b - .\n.popsection\n");
}`
	obj := mustLoad(t, compileC(t, src, "-fpatchable-function-entry=5", "-mfunction-return=keep"))
	und := strings.Join(obj.Undefined(), " ")
	if und != "__SCT__foo" {
		t.Errorf("Undefined() = %q, want only __SCT__foo (__SCK__foo is used only by .static_call_sites)", und)
	}
	img, err := obj.Link("f", testLayout, func(name string) (uint64, bool) {
		if name == "__SCT__foo" {
			return 0xffffffffbc000100, true
		}
		return 0, false
	})
	if err != nil {
		t.Fatal(err)
	}
	ignored := map[string]bool{}
	for _, s := range img.Map.Ignored {
		ignored[s.Name] = true
	}
	for _, s := range []string{".static_call_sites", ".smp_locks", "__patchable_function_entries"} {
		if !ignored[s] {
			t.Errorf("%s not listed as ignored: %v", s, img.Map.Ignored)
		}
	}
	if !strings.Contains(strings.Join(img.Map.Notes, "\n"), "__SCT__* trampolines") {
		t.Errorf("no static-call note: %v", img.Map.Notes)
	}
}
