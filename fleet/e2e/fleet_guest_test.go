// Package e2e is the fleet's end-to-end test: a real etcd and
// kube-apiserver, the controller binary, two hvpatchd node agents
// (--kubernetes, different node names), each owning one TCG guest.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/fleet/api"
	"github.com/hvpatch/hvpatch/internal/kubetest"
	"github.com/hvpatch/hvpatch/internal/testguest"
	"github.com/hvpatch/hvpatch/patchsign"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func binaries(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := testguest.RepoRoot()
		if err != nil {
			buildErr = err
			return
		}
		if binDir, buildErr = os.MkdirTemp("", "hvpatch-fleet-bin-"); buildErr != nil {
			return
		}
		for _, pkg := range []string{"hvpatchd", "hvpatch-controller"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, pkg), "./cmd/"+pkg)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build ./cmd/%s: %v\n%s", pkg, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// proc is a subprocess that can be killed and started again.
type proc struct {
	t    *testing.T
	name string
	args []string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

func newProc(t *testing.T, dir, name string, args ...string) *proc {
	p := &proc{t: t, name: name, args: args, log: filepath.Join(dir, name+".log")}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s log tail:\n%s", name, tail(p.logText(), 30))
		}
	})
	return p
}

func (p *proc) start() {
	p.t.Helper()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	p.cmd = exec.Command(p.args[0], p.args[1:]...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func(c *exec.Cmd, d chan struct{}) { c.Wait(); close(d) }(p.cmd, p.done)
}

// kill is SIGKILL: nothing of the process's shutdown runs.
func (p *proc) kill() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

func (p *proc) logText() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

func tail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func returnPatch(id string) string {
	return "id: " + id + "\ndescription: \"fleet test: /proc/version reads empty\"\n" +
		"match: {release: [\"6.1.*\", \"6.12.*\"]}\nedits:\n  - {kind: return, function: version_proc_show, value: 0}\n"
}

type fleet struct {
	t      *testing.T
	c      client.Client
	guests map[string]*testguest.Guest // by node
	stages []string
	last   time.Time
}

func (f *fleet) stage(name string) {
	now := time.Now()
	f.stages = append(f.stages, fmt.Sprintf("%-58s %v", name, now.Sub(f.last).Round(100*time.Millisecond)))
	f.last = now
}

func (f *fleet) wait(name string, timeout time.Duration, ok func(*api.HotPatch) bool) *api.HotPatch {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	var hp api.HotPatch
	for time.Now().Before(deadline) {
		if err := f.c.Get(context.Background(), client.ObjectKey{Name: name}, &hp); err == nil && ok(&hp) {
			return &hp
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.t.Fatalf("HotPatch %s: condition not met within %v; status %+v", name, timeout, hp.Status)
	return nil
}

func (f *fleet) procVersion(node string) string {
	return strings.TrimSpace(f.guests[node].MustRun("wc -c </proc/version"))
}

func (f *fleet) nodeStatus(hp, node string) *api.HotPatchNode {
	var n api.HotPatchNode
	if err := f.c.Get(context.Background(), client.ObjectKey{Name: api.NodeObjectName(hp, node)}, &n); err != nil {
		return nil
	}
	return &n
}

// TestFleetRollout: canary -> all on two agents with one TCG guest each,
// the agents and the controller killed and restarted mid-rollout, every
// guest shows the fix, the counts match; rollback; then a second patch
// signed by a key only node-a trusts fails hvpatchd's verification on
// node-b, halts with the reason, and rollback reverts node-a.
func TestFleetRollout(t *testing.T) {
	testguest.Need(t)
	k := kubetest.Start(t)
	bin := binaries(t)
	ctx := context.Background()
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	kern, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	f := &fleet{t: t, c: k.Client, guests: map[string]*testguest.Guest{}, last: time.Now()}
	defer func() { t.Logf("stages:\n  %s", strings.Join(f.stages, "\n  ")) }()
	nodes := []string{"node-a", "node-b"}
	for _, n := range nodes {
		f.guests[n] = testguest.Start(t, testguest.Options{Kernel: kern, VCPUs: 1})
		if got := f.procVersion(n); got == "0" {
			t.Fatalf("%s: /proc/version empty before any patch", n)
		}
		if err := k.Client.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}); err != nil {
			t.Fatal(err)
		}
	}
	f.stage("etcd, kube-apiserver, CRDs, 2 TCG guests booted")

	// Keys: key1 is trusted by both agents, key2 only by node-a's.
	keys := map[string]string{}
	for _, name := range []string{"key1", "key2"} {
		kd := filepath.Join(dir, name)
		os.MkdirAll(kd, 0o755)
		pub, priv, err := patchsign.GenerateKey(kd, name)
		if err != nil {
			t.Fatal(err)
		}
		keys[name+".pub"], keys[name] = pub, priv
	}
	agents := map[string]*proc{}
	for _, n := range nodes {
		nd := filepath.Join(dir, n)
		os.MkdirAll(filepath.Join(nd, "patches"), 0o755)
		trusted := keys["key1.pub"]
		if n == "node-a" {
			trusted += ", " + keys["key2.pub"]
		}
		cfg := fmt.Sprintf(`libvirt: {socket: %s}
state_dir: %s/state
patch_dir: %s/patches
api: {socket: %s/hvpatchd.sock}
reconcile: {interval: 5s}
log: {format: json, level: info}
signing: {require_signed: true, trusted_keys: [%s]}
kubernetes: {enabled: true, node: %s, kubeconfig: %s, domains: [%s], resync: 3s}
`, testguest.LibvirtSocket(), nd, nd, nd, trusted, n, k.Kubeconfig, f.guests[n].Name)
		os.WriteFile(filepath.Join(nd, "hvpatchd.yaml"), []byte(cfg), 0o644)
		agents[n] = newProc(t, dir, "hvpatchd-"+n, filepath.Join(bin, "hvpatchd"), "--config", filepath.Join(nd, "hvpatchd.yaml"))
		agents[n].start()
	}
	ctl := newProc(t, dir, "controller", filepath.Join(bin, "hvpatch-controller"), "--kubeconfig", k.Kubeconfig, "--resync", "2s", "--min-status-interval", "500ms")
	ctl.start()
	f.stage("agents and controller started")

	sign := func(key, patch string) *api.Bundle {
		priv, err := patchsign.LoadPrivateKey(keys[key])
		if err != nil {
			t.Fatal(err)
		}
		return &api.Bundle{Patch: patch, Signature: string(patchsign.Sign(priv, []byte(patch)))}
	}

	// 1. canary (node-a) -> all (node-b), 8 s pause between.
	hp := &api.HotPatch{ObjectMeta: metav1.ObjectMeta{Name: "cve-version"}, Spec: api.HotPatchSpec{
		Bundle:   sign("key1", returnPatch("fleet-version-a")),
		Selector: api.Selector{Domains: []string{"hvpt-*"}},
		Strategy: api.Strategy{Canary: 1, Pause: metav1.Duration{Duration: 8 * time.Second},
			Gates: api.Gates{GuestAlive: true, NoOops: true}},
	}}
	if err := k.Client.Create(ctx, hp); err != nil {
		t.Fatal(err)
	}
	f.wait("cve-version", 3*time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Counts.Applied == 1 })
	if got := f.procVersion("node-a"); got != "0" {
		t.Fatalf("canary node-a applied, guest /proc/version has %s bytes", got)
	}
	if got := f.procVersion("node-b"); got == "0" {
		t.Fatal("node-b patched during the canary")
	}
	f.stage("canary wave applied (node-a)")
	canary := f.nodeStatus("cve-version", "node-a")

	// Mid-rollout, in the pause: both agents and the controller are
	// killed; the controller comes back first and releases node-b while
	// its agent is down; then both agents come back.
	agents["node-a"].kill()
	agents["node-b"].kill()
	ctl.kill()
	ctl.start()
	f.wait("cve-version", time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Released == 2 })
	if n := f.nodeStatus("cve-version", "node-b"); n == nil || n.Status.ObservedGeneration != 0 {
		t.Fatalf("node-b's release acted on while its agent is down: %+v", n)
	}
	f.stage("controller restarted, wave released to node-b (agent down)")
	agents["node-a"].start()
	agents["node-b"].start()
	got := f.wait("cve-version", 3*time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Phase == api.PhaseComplete })
	f.stage("agents restarted; rollout complete")
	if got.Status.Counts != (api.VMCounts{Total: 2, Applied: 2}) || got.Status.Released != 2 || got.Status.Waves != 2 {
		t.Fatalf("complete: counts %+v", got.Status)
	}
	for _, n := range nodes {
		if v := f.procVersion(n); v != "0" {
			t.Fatalf("%s: guest /proc/version has %s bytes after the rollout", n, v)
		}
	}
	// No double apply: node-a's agent, restarted, found the patch in its
	// journal and did not write it again nor rewrite its status.
	time.Sleep(4 * time.Second) // one resync of the restarted agent
	logA := agents["node-a"].logText()
	if c := strings.Count(logA, `"msg":"kubernetes: patch applied"`); c != 1 {
		t.Errorf("node-a: patch applied %d times, want once", c)
	}
	// (Whether the restarted agent asks hvpatchd again, which answers from
	// its journal, depends on whether the kill came before or after the
	// agent wrote its status; either way nothing is applied twice.)
	if after := f.nodeStatus("cve-version", "node-a"); after.ResourceVersion != canary.ResourceVersion {
		t.Errorf("node-a's status was rewritten after the restart (%s -> %s)", canary.ResourceVersion, after.ResourceVersion)
	}

	// 2. Rollback, in waves.
	got.Spec.Rollback = true
	if err := k.Client.Update(ctx, got); err != nil {
		t.Fatal(err)
	}
	got = f.wait("cve-version", 3*time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Phase == api.PhaseRolledBack })
	if got.Status.Counts != (api.VMCounts{Total: 2, Reverted: 2}) {
		t.Fatalf("rolled back: %+v", got.Status)
	}
	for _, n := range nodes {
		if v := f.procVersion(n); v == "0" {
			t.Fatalf("%s: /proc/version still empty after the rollback", n)
		}
	}
	f.stage("rollback of both waves")

	// 3. Signed by key2: node-a verifies it, node-b refuses it (failed
	// verification): the rollout halts with the reason; rollback reverts
	// node-a.
	hp2 := &api.HotPatch{ObjectMeta: metav1.ObjectMeta{Name: "cve-other-key"}, Spec: api.HotPatchSpec{
		Bundle:   sign("key2", returnPatch("fleet-version-b")),
		Selector: api.Selector{Domains: []string{"hvpt-*"}},
		Strategy: api.Strategy{Canary: 1, FailureBudget: 0},
	}}
	if err := k.Client.Create(ctx, hp2); err != nil {
		t.Fatal(err)
	}
	got = f.wait("cve-other-key", 3*time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Phase == api.PhaseHalted })
	if got.Status.Counts.Applied != 1 || got.Status.Counts.Failed != 1 || len(got.Status.Failures) != 1 ||
		got.Status.Failures[0].Node != "node-b" || !strings.Contains(got.Status.Message, "verification") {
		t.Fatalf("halted: %+v", got.Status)
	}
	t.Logf("halted: %s", got.Status.Message)
	if v := f.procVersion("node-a"); v != "0" {
		t.Fatal("node-a: canary of the second patch not applied")
	}
	f.stage("second patch: canary applied, node-b failed verification, halted")
	got.Spec.Rollback = true
	if err := k.Client.Update(ctx, got); err != nil {
		t.Fatal(err)
	}
	got = f.wait("cve-other-key", 3*time.Minute, func(hp *api.HotPatch) bool { return hp.Status.Phase == api.PhaseRolledBack })
	if got.Status.Counts != (api.VMCounts{Total: 2, Reverted: 2}) {
		t.Errorf("second rollback: counts %+v", got.Status.Counts)
	}
	for _, n := range nodes {
		if v := f.procVersion(n); v == "0" {
			t.Fatalf("%s: /proc/version empty after the second rollback", n)
		}
	}
	f.stage("rollback after the halt")
	t.Logf("agent status writes: node-a %d, node-b %d", strings.Count(agents["node-a"].logText(), "node status written"), strings.Count(agents["node-b"].logText(), "node status written"))
}
