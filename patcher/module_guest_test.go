package patcher

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// TestGuestEverySeries runs, on every Debian series (kernels.txt and the
// extra kernels: 5.10, 6.1, 6.12, 6.12+deb13, 7.x), a return patch on a
// kernel function (whatever NOP form the guest put at its fentry site; the
// revert puts back exactly those bytes) and one on a module function:
// dummy_change_carrier of the package's own dummy.ko returns -EPERM, so
// that writing /sys/class/net/dummy0/carrier fails and the carrier stays;
// the revert restores it.
func TestGuestEverySeries(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests")
	}
	ks, err := testguest.AllKernels()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		t.Run(k.Series, func(t *testing.T) {
			lg := startLive(t, k)
			t.Run("KernelReturn", func(t *testing.T) { lg.testReturnExactBytes(t) })
			t.Run("ModuleReturn", func(t *testing.T) { lg.testModuleReturn(t) })
		})
	}
}

func (lg *liveGuest) testReturnExactBytes(t *testing.T) {
	ctx := context.Background()
	p := loadExample(t, "version-kill-switch.yaml")
	p.Match = Match{Release: StringList{"*"}} // the example names 6.1 and 6.12 only
	pl, err := lg.pt.Plan(lg.live.Domain, p, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := pl.Edits[0]
	before := make([]byte, SiteLen)
	if err := lg.live.Target.ReadVirt(e.VA, before); err != nil {
		t.Fatal(err)
	}
	t.Logf("fentry site of %s holds % x", e.Symbol, before)
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := lg.g.MustRun("cat /proc/version"); got != "" {
		t.Fatalf("/proc/version with the kill switch: %q", got)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	after := make([]byte, SiteLen)
	if err := lg.live.Target.ReadVirt(e.VA, after); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after, before) {
		t.Fatalf("after revert the site holds % x, before the patch % x", after, before)
	}
	if got := lg.g.MustRun("cat /proc/version"); !strings.HasPrefix(got, "Linux version") {
		t.Fatalf("/proc/version after revert: %q", got)
	}
	t.Logf("apply: %s", res.Message)
}

func (lg *liveGuest) testModuleReturn(t *testing.T) {
	ctx := context.Background()
	if err := lg.g.LoadModule("dummy"); err != nil {
		t.Fatal(err)
	}
	carrier := func() string {
		return strings.TrimSpace(lg.g.MustRun("cat /sys/class/net/dummy0/carrier"))
	}
	lg.g.MustRun("ip link set dummy0 up")
	lg.g.MustRun("echo 0 >/sys/class/net/dummy0/carrier")
	if c := carrier(); c != "0" {
		t.Fatalf("carrier after writing 0: %q", c)
	}
	lg.g.MustRun("echo 1 >/sys/class/net/dummy0/carrier")

	v := int64(-1) // -EPERM
	p := &Patch{ID: "dummy-carrier-lock", Match: Match{Release: StringList{"*"}},
		Edits: []Edit{{Kind: KindReturn, Function: "dummy_change_carrier", Module: "dummy", Value: &v}}}
	res, err := lg.pt.Apply(ctx, lg.live.Domain, p, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := res.Plan.Edits[0]
	t.Logf("apply: %s; site %#x (%s+%#x), original % x", res.Message, e.VA, e.Symbol, e.Offset, e.Old)
	if e.VA < lg.live.Kernel.TextEnd {
		t.Fatalf("the module function's site %#x is inside the kernel image", e.VA)
	}
	out, err := lg.g.Run("echo 0 >/sys/class/net/dummy0/carrier")
	if err == nil || !strings.Contains(out, "not permitted") {
		t.Fatalf("writing the carrier with the patch: %q, %v; want Operation not permitted", out, err)
	}
	if c := carrier(); c != "1" {
		t.Fatalf("carrier with the patch: %q, want 1 (unchanged)", c)
	}
	if _, err := lg.pt.Revert(ctx, lg.live.Domain, p.ID); err != nil {
		t.Fatal(err)
	}
	lg.g.MustRun("echo 0 >/sys/class/net/dummy0/carrier")
	if c := carrier(); c != "0" {
		t.Fatalf("carrier after revert and writing 0: %q", c)
	}
}
