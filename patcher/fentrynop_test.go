package patcher

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/codearea"
)

// k8Nop is K8_NOP5_ATOMIC, the fentry NOP 5.10 kernels write on CPUs
// without the P6 preference (QEMU's TCG models).
var k8Nop = []byte{0x66, 0x66, 0x66, 0x66, 0x90}

// setSite puts b at the fentry site of fn (after endbr64 when there is one).
func setSite(t *testing.T, ft *fakeTarget, fn string, b []byte) uint64 {
	t.Helper()
	sym := ft.sym(t, fn)
	site := sym.Addr
	if bytes.HasPrefix(ft.read(t, sym.Addr, 4), Endbr64) {
		site += 4
	}
	for i, c := range b {
		ft.mem[site+uint64(i)] = c
	}
	return site
}

func TestFentryNopForms(t *testing.T) {
	for _, b := range [][]byte{FentryNop, k8Nop} {
		if !IsFentryNop(b) || !codearea.IsFentryNop(b) {
			t.Fatalf("% x not accepted", b)
		}
	}
	for _, b := range [][]byte{
		{0x66, 0x66, 0x90, 0x66, 0x90}, // K8_NOP5: two instructions
		{0x3e, 0x8d, 0x74, 0x26, 0x00}, // GENERIC_NOP5_ATOMIC: lea in 64-bit mode
		{0x0f, 0x1f, 0x44, 0x00},
		{0xe8, 0, 0, 0, 0},
	} {
		if IsFentryNop(b) {
			t.Fatalf("% x accepted as a fentry NOP", b)
		}
	}
}

// A 5.10-style site (K8_NOP5_ATOMIC) is patched, and a revert puts back
// exactly those bytes, not the P6 NOP.
func TestApplyRevertK8Nop(t *testing.T) {
	for _, s := range series {
		t.Run(s, func(t *testing.T) {
			d, ft, _, pt := fakeDomain(t, s)
			site := setSite(t, ft, "version_proc_show", k8Nop)
			ctx := context.Background()
			p := returnPatch("version_proc_show", 0)
			res, err := pt.Apply(ctx, d, p, ApplyOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if e := res.Plan.Edits[0]; !bytes.Equal(e.Old, k8Nop) || e.VA != site || len(e.Before) != 1 || !strings.HasSuffix(e.Before[0].Text, "nop") {
				t.Fatalf("planned edit %+v", e)
			}
			j, _ := pt.State.Load(d.Name, d.UUID)
			if jp := j.Find(p.ID); jp == nil || !bytes.Equal(jp.Edits[0].Old, k8Nop) {
				t.Fatalf("journal %+v", jp)
			}
			if _, err := pt.Revert(ctx, d, p.ID); err != nil {
				t.Fatal(err)
			}
			if got := ft.read(t, site, 5); !bytes.Equal(got, k8Nop) {
				t.Fatalf("after revert the site holds % x, want % x", got, k8Nop)
			}
		})
	}
}

// A site that already holds the return sequence, with no journal entry,
// is recorded with the NOP form the guest's other fentry sites hold.
func TestAlreadyAppliedTakesGuestNopForm(t *testing.T) {
	d, ft, _, pt := fakeDomain(t, "6.1")
	n := 0
	for _, fn := range nopProbes {
		if len(ft.syms[fn]) == 1 && fn != "version_proc_show" {
			if ft.ReadVirt(ft.syms[fn][0].Addr, make([]byte, 9)) == nil {
				setSite(t, ft, fn, k8Nop)
				n++
			}
		}
	}
	if n == 0 {
		t.Skip("the fixture holds no probe function's code")
	}
	seq, _ := ReturnSequence(0, false)
	site := setSite(t, ft, "version_proc_show", seq)
	ctx := context.Background()
	p := returnPatch("version_proc_show", 0)
	res, err := pt.Apply(ctx, d, p, ApplyOptions{})
	if err != nil || !res.NoOp {
		t.Fatalf("apply over the return sequence: %+v, %v", res, err)
	}
	if !bytes.Equal(res.Plan.Edits[0].Old, k8Nop) {
		t.Fatalf("recorded original % x, want the guest's form % x", res.Plan.Edits[0].Old, k8Nop)
	}
	if _, err := pt.Revert(ctx, d, p.ID); err != nil {
		t.Fatal(err)
	}
	if got := ft.read(t, site, 5); !bytes.Equal(got, k8Nop) {
		t.Fatalf("after revert % x", got)
	}
}

func TestEntrySiteRefusesOtherBytes(t *testing.T) {
	ft := loadFixture(t, "6.1")
	setSite(t, ft, "version_proc_show", []byte{0x66, 0x66, 0x90, 0x66, 0x90})
	_, err := MakePlan(ft, returnPatch("version_proc_show", 0), PlanOptions{})
	if err == nil || !strings.Contains(err.Error(), "want a 5-byte NOP") {
		t.Fatalf("two-instruction NOP at the site: %v", err)
	}
}
