package patcher

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/codearea"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/internal/testkernel"
)

// dummyCarrierSource replaces dummy_change_carrier of dummy.ko with one
// that sets the opposite carrier. It calls the kernel's exports and reads
// numdummies, a static variable of dummy.ko, twice: by its plain name and
// as "numdummies,1" (the first numdummies in the module's own table), the
// names a module's replacement links against.
const dummyCarrierSource = `
struct net_device;
extern void netif_carrier_on(struct net_device *dev);
extern void netif_carrier_off(struct net_device *dev);
extern int numdummies;
extern int numdummies_1 __asm__("\"numdummies,1\""); /* quoted for the assembler */

int hvpatch_dummy_change_carrier(struct net_device *dev, _Bool new_carrier)
{
	if (numdummies != numdummies_1)
		return -22;
	if (new_carrier)
		netif_carrier_off(dev);
	else
		netif_carrier_on(dev);
	return 0;
}
`

// TestGuestModuleReplace: a replace edit and a bytes edit on
// dummy_change_carrier of dummy.ko. The replacement (linked against the
// module's own symbols, then the kernel's) inverts what writing
// /sys/class/net/dummy0/carrier does; the revert restores it and releases
// the code. The bytes edit puts "return -1" at the fentry site: writing
// the carrier fails with EPERM until the revert. 6.1 and 6.12;
// HVPATCH_TEST_EXTRA=1 adds the extra series.
func TestGuestModuleReplace(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	ks, err := testguest.Kernels()
	if err != nil {
		t.Fatal(err)
	}
	if os.Getenv("HVPATCH_TEST_EXTRA") != "" {
		extra, err := testguest.ExtraKernels()
		if err != nil {
			t.Fatal(err)
		}
		ks = append(ks, extra...)
	}
	only := os.Getenv("HVPATCH_TEST_SERIES")
	for _, k := range ks {
		if only != "" && k.Series != only {
			continue
		}
		t.Run(k.Series, func(t *testing.T) {
			lg := startLive(t, k)
			objs := testkernel.BuildReplacements(t, k, map[string]string{"dummy_carrier": dummyCarrierSource})
			if err := lg.g.LoadModule("dummy"); err != nil {
				t.Fatal(err)
			}
			lg.g.MustRun("ip link set dummy0 up")
			t.Run("Replace", func(t *testing.T) { lg.testModuleReplace(t, filepath.Join(objs, "dummy_carrier.o")) })
			t.Run("Bytes", func(t *testing.T) { lg.testModuleBytes(t) })
			if err := lg.g.ConsoleError(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func (lg *liveGuest) carrierAfter(t *testing.T, v string) string {
	t.Helper()
	lg.g.MustRun("echo " + v + " >/sys/class/net/dummy0/carrier")
	return strings.TrimSpace(lg.g.MustRun("cat /sys/class/net/dummy0/carrier"))
}

func (lg *liveGuest) testModuleReplace(t *testing.T, obj string) {
	ctx := context.Background()
	if c0, c1 := lg.carrierAfter(t, "0"), lg.carrierAfter(t, "1"); c0 != "0" || c1 != "1" {
		t.Fatalf("carrier before the patch: after 0 %q, after 1 %q", c0, c1)
	}
	p := &Patch{ID: "dummy-carrier-replace", Match: Match{Release: StringList{"*"}},
		Edits: []Edit{{Kind: KindReplace, Function: "dummy_change_carrier", Module: "dummy", Object: obj, With: "hvpatch_dummy_change_carrier"}}}
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := res.Plan.Edits[0]
	t.Logf("apply: %s; site %#x, jump to %#x; link map:\n%s", res.Message, e.VA, e.Replace.WithAddr, e.Replace.LinkMapText())
	if e.VA < lg.live.Kernel.TextEnd || e.Module != "dummy" || e.ModuleBase == 0 {
		t.Fatalf("planned edit at %#x in %q (base %#x): want a module site", e.VA, e.Module, e.ModuleBase)
	}
	// numdummies resolved to dummy.ko's own variable, both spellings.
	mods, err := lg.live.Kernel.ModuleSymbols()
	if err != nil {
		t.Fatal(err)
	}
	var numdummies uint64
	for _, s := range mods {
		if s.Module == "dummy" && s.Name == "numdummies" {
			numdummies = s.Addr
		}
	}
	if numdummies == 0 {
		t.Fatal("numdummies not among dummy.ko's symbols")
	}
	imports := map[string]uint64{}
	for _, im := range e.Replace.LinkMap.Imports {
		imports[im.Name] = im.Addr
	}
	for _, name := range []string{"numdummies", "numdummies,1"} {
		if imports[name] != numdummies {
			t.Errorf("%s linked to %#x, want dummy.ko's numdummies at %#x", name, imports[name], numdummies)
		}
	}
	if a, err := lg.live.Kernel.SymbolAddr("netif_carrier_on"); err != nil || imports["netif_carrier_on"] != a {
		t.Errorf("netif_carrier_on linked to %#x, the kernel's is at %#x (%v)", imports["netif_carrier_on"], a, err)
	}
	if c1, c0 := lg.carrierAfter(t, "1"), lg.carrierAfter(t, "0"); c1 != "0" || c0 != "1" {
		t.Fatalf("carrier with the replacement: after 1 %q, after 0 %q; want inverted", c1, c0)
	}
	rres, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("revert: %s", rres.Message)
	if c0, c1 := lg.carrierAfter(t, "0"), lg.carrierAfter(t, "1"); c0 != "0" || c1 != "1" {
		t.Fatalf("carrier after the revert: after 0 %q, after 1 %q", c0, c1)
	}
	area, err := codearea.Find(lg.live.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	if ents := area.Entries(); len(ents) != 0 {
		t.Fatalf("code area after the revert: %+v", ents)
	}
}

func (lg *liveGuest) testModuleBytes(t *testing.T) {
	ctx := context.Background()
	syms, err := KernelTarget{lg.live.Kernel}.ModuleSymbols("dummy", "dummy_change_carrier")
	if err != nil || len(syms) != 1 {
		t.Fatalf("dummy_change_carrier [dummy]: %v %v", syms, err)
	}
	head := make([]byte, len(Endbr64)+SiteLen)
	if err := lg.live.Target.ReadVirt(syms[0].Addr, head); err != nil {
		t.Fatal(err)
	}
	off := uint64(0)
	if strings.HasPrefix(string(head), string(Endbr64)) {
		off = uint64(len(Endbr64))
	}
	ret, _ := ReturnSequence(-1, false)
	p := &Patch{ID: "dummy-carrier-bytes", Match: Match{Release: StringList{"*"}},
		Edits: []Edit{{Kind: KindBytes, Symbol: "dummy_change_carrier", Module: "dummy", Offset: &off,
			Expect: HexBytes(head[off : off+SiteLen]), Replace: HexBytes(ret)}}}
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("apply: %s", res.Message)
	out, err := lg.g.Run("echo 0 >/sys/class/net/dummy0/carrier")
	if err == nil || !strings.Contains(out, "not permitted") {
		t.Fatalf("writing the carrier with the bytes edit: %q, %v; want Operation not permitted", out, err)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	if c := lg.carrierAfter(t, "0"); c != "0" {
		t.Fatalf("carrier after revert and writing 0: %q", c)
	}
	after := make([]byte, len(head))
	if err := lg.live.Target.ReadVirt(syms[0].Addr, after); err != nil || string(after) != string(head) {
		t.Fatalf("function entry after revert % x, before % x (%v)", after, head, err)
	}
}
