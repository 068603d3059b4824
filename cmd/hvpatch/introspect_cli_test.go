package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/service"
)

// TestIntrospectCLI runs info, sym, syms, read, ps and lsmod against a live
// 6.1 guest and against a memory dump of it, and checks the answers with the
// guest's own view.
func TestIntrospectCLI(t *testing.T) {
	testguest.Need(t)
	kern, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	g := testguest.Start(t, testguest.Options{Kernel: kern, VCPUs: 2, MemoryMiB: 512})
	if err := g.LoadModule("dummy"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	conn, err := hypervisor.Connect(ctx, hypervisor.Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dom, err := conn.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	mustJSON := func(v any, args ...string) {
		t.Helper()
		out, stderr, code := runCLI(t, append([]string{"--json"}, args...)...)
		if code != 0 {
			t.Fatalf("hvpatch %v: exit %d: %s", args, code, stderr)
		}
		if err := json.Unmarshal([]byte(out), v); err != nil {
			t.Fatalf("hvpatch %v: bad JSON %q: %v", args, out, err)
		}
	}

	// The guest's view, taken while nothing of ours runs in it.
	guestSym := strings.Fields(g.MustRun("grep -w version_proc_show /proc/kallsyms"))
	guestMods, err := g.Modules()
	if err != nil {
		t.Fatal(err)
	}
	symAddr, err := strconv.ParseUint(guestSym[0], 16, 64)
	if err != nil {
		t.Fatalf("guest kallsyms line %q", guestSym)
	}

	dump := filepath.Join(t.TempDir(), "guest.elf")
	var liveInfo, dumpInfo infoResult
	var livePS, dumpPS []taskJSON
	var liveMods, dumpMods []moduleJSON
	var liveSyms, dumpSyms []symbolJSON
	psBefore, err := g.PS()
	if err != nil {
		t.Fatal(err)
	}
	mustJSON(&livePS, "ps", g.Name)
	if err := dom.DumpMemory(ctx, dump); err != nil {
		t.Fatal(err)
	}
	mustJSON(&dumpPS, "ps", "--dump", dump)
	psAfter, err := g.PS()
	if err != nil {
		t.Fatal(err)
	}

	for _, src := range []struct {
		name string
		args []string
		info *infoResult
		mods *[]moduleJSON
		syms *[]symbolJSON
	}{
		{"live", []string{g.Name}, &liveInfo, &liveMods, &liveSyms},
		{"dump", []string{"--dump", dump}, &dumpInfo, &dumpMods, &dumpSyms},
	} {
		t.Run(src.name, func(t *testing.T) {
			mustJSON(src.info, append([]string{"info"}, src.args...)...)
			if src.info.Release != g.Release || !src.info.BTF || src.info.Symbols < 50000 {
				t.Errorf("info: %+v; guest release %s", *src.info, g.Release)
			}
			mustJSON(src.mods, append([]string{"lsmod"}, src.args...)...)
			if len(*src.mods) != len(guestMods) {
				t.Errorf("lsmod: %+v; guest /proc/modules %+v", *src.mods, guestMods)
			}
			for i, m := range *src.mods {
				if i < len(guestMods) && (m.Name != guestMods[i].Name || m.Size != guestMods[i].Size || m.Base != fmt.Sprintf("%#x", guestMods[i].Addr)) {
					t.Errorf("lsmod %+v; guest %+v", m, guestMods[i])
				}
			}
			// One JSON shape for a name and an address.
			var byName, byAddr service.SymLookup
			mustJSON(&byName, append([]string{"sym"}, append(src.args, "version_proc_show")...)...)
			if len(byName.Symbols) != 1 || byName.ByAddr || byName.Symbols[0].Addr != fmt.Sprintf("%#x", symAddr) || byName.Symbols[0].Type != guestSym[1] || byName.Symbols[0].GapToNext == 0 {
				t.Errorf("sym version_proc_show: %+v; guest %q", byName, guestSym)
			}
			mustJSON(&byAddr, append([]string{"sym"}, append(src.args, fmt.Sprintf("%#x", symAddr+3))...)...)
			if !byAddr.ByAddr || len(byAddr.Symbols) != 1 || byAddr.Symbols[0].Name != "version_proc_show" || byAddr.Symbols[0].Offset != 3 {
				t.Errorf("sym ADDR+3: %+v", byAddr)
			}
			mustJSON(src.syms, append([]string{"syms", "--grep", "^version_proc_"}, src.args...)...)
			if len(*src.syms) == 0 || (*src.syms)[0].Name != "version_proc_show" {
				t.Errorf("syms --grep: %+v", *src.syms)
			}
			// Disassembly of the function's entry: on 6.1 the fentry site is
			// the 5-byte NOP ftrace leaves when tracing is off.
			var insts []instJSON
			mustJSON(&insts, append([]string{"read", "--disasm"}, append(src.args, "version_proc_show", "5")...)...)
			if len(insts) != 1 || insts[0].Bytes != "0f1f440000" || insts[0].Where != "version_proc_show+0x0" {
				t.Errorf("read --disasm: %+v", insts)
			}
			// A listing asked for 7 bytes lists the instructions starting in
			// them, even when the last runs past the end.
			mustJSON(&insts, append([]string{"read", "--disasm"}, append(src.args, "version_proc_show", "7")...)...)
			if len(insts) != 2 || insts[1].Addr != fmt.Sprintf("%#x", symAddr+5) {
				t.Errorf("read --disasm of 7 bytes: %+v", insts)
			}
			// Errors name what was not found.
			_, stderr, code := runCLI(t, append([]string{"sym"}, append(src.args, "0xffffffff00000000")...)...)
			if code == 0 || !strings.Contains(stderr, "0xffffffff00000000") {
				t.Errorf("sym of an address outside the kernel: exit %d, %q", code, stderr)
			}
			_, stderr, code = runCLI(t, append([]string{"sym"}, append(src.args, "no_such_symbol_xyz")...)...)
			if code == 0 || !strings.Contains(stderr, "no_such_symbol_xyz") {
				t.Errorf("sym of a missing name: exit %d, %q", code, stderr)
			}
		})
	}

	// The dump answers like the live guest.
	if liveInfo.Release != dumpInfo.Release || liveInfo.Slide != dumpInfo.Slide || liveInfo.Symbols != dumpInfo.Symbols ||
		liveInfo.Text != dumpInfo.Text || liveInfo.DirectMapBase != dumpInfo.DirectMapBase {
		t.Errorf("info differs:\nlive %+v\ndump %+v", liveInfo, dumpInfo)
	}
	if fmt.Sprint(liveMods) != fmt.Sprint(dumpMods) || fmt.Sprint(liveSyms) != fmt.Sprint(dumpSyms) {
		t.Errorf("lsmod or syms differ: live %v %v, dump %v %v", liveMods, liveSyms, dumpMods, dumpSyms)
	}
	// ps: every process the guest showed before and after, unchanged, is in
	// both listings with the same parent; the kernel-thread names /proc
	// prints can be longer than task->comm.
	type key struct{ pid, ppid int }
	guest := map[key]string{}
	for _, p := range psBefore {
		guest[key{p.PID, p.PPID}] = p.Comm
	}
	stable := 0
	for _, p := range psAfter {
		if c, ok := guest[key{p.PID, p.PPID}]; !ok || c != p.Comm {
			continue
		}
		stable++
		for name, list := range map[string][]taskJSON{"live": livePS, "dump": dumpPS} {
			found := false
			for _, tk := range list {
				if tk.PID == p.PID {
					found = tk.PPID == p.PPID && tk.Comm != "" && strings.HasPrefix(p.Comm, tk.Comm)
				}
			}
			if !found {
				t.Errorf("%s ps: guest process %d (%s, ppid %d) missing or different", name, p.PID, p.Comm, p.PPID)
			}
		}
	}
	if stable < 20 {
		t.Errorf("only %d stable guest processes to compare", stable)
	}
	t.Logf("live attach %.1f ms, dump attach %.1f ms; %d processes compared; %d symbols", liveInfo.AttachMS, dumpInfo.AttachMS, stable, liveInfo.Symbols)
}
