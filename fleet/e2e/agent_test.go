package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/fleet/api"
	"github.com/hvpatch/hvpatch/internal/kubetest"
	"github.com/hvpatch/hvpatch/internal/testguest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// TestAgentAndControllerProcesses: the controller binary and an hvpatchd
// --kubernetes agent owning no domain, against a real API server: the
// agent acts on its node's release (an empty VM list) and the rollout
// completes; no guest is booted.
func TestAgentAndControllerProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd, kube-apiserver, hvpatchd")
	}
	if _, err := os.Stat(testguest.LibvirtSocket()); err != nil {
		t.Skipf("no libvirt socket: %v", err)
	}
	k := kubetest.Start(t)
	bin := binaries(t)
	dir := t.TempDir()
	ctx := context.Background()
	if err := k.Client.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "lonely"}}); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`libvirt: {socket: %s}
state_dir: %s/state
patch_dir: %s/patches
api: {socket: %s/hvpatchd.sock}
log: {format: json, level: info}
signing: {trusted_keys: []}
kubernetes: {enabled: true, node: lonely, kubeconfig: %s, domains: [no-such-domain], resync: 2s}
`, testguest.LibvirtSocket(), dir, dir, dir, k.Kubeconfig)
	os.WriteFile(filepath.Join(dir, "hvpatchd.yaml"), []byte(cfg), 0o644)
	agent := newProc(t, dir, "hvpatchd", filepath.Join(bin, "hvpatchd"), "--config", filepath.Join(dir, "hvpatchd.yaml"))
	agent.start()
	ctl := newProc(t, dir, "controller", filepath.Join(bin, "hvpatch-controller"), "--kubeconfig", k.Kubeconfig, "--resync", "2s")
	ctl.start()
	hp := &api.HotPatch{ObjectMeta: metav1.ObjectMeta{Name: "nothing-to-do"}, Spec: api.HotPatchSpec{
		Bundle: &api.Bundle{Patch: returnPatch("x")}, Selector: api.Selector{Domains: []string{"*"}}}}
	if err := k.Client.Create(ctx, hp); err != nil {
		t.Fatal(err)
	}
	f := &fleet{t: t, c: k.Client}
	got := f.wait("nothing-to-do", time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Phase == api.PhaseComplete })
	var n api.HotPatchNode
	if err := k.Client.Get(ctx, client.ObjectKey{Name: api.NodeObjectName("nothing-to-do", "lonely")}, &n); err != nil {
		t.Fatal(err)
	}
	if n.Status.ObservedGeneration != n.Generation || n.Status.Action != api.ActionApply || got.Status.Counts.Total != 0 {
		t.Fatalf("node status %+v, hotpatch %+v", n.Status, got.Status)
	}
}
