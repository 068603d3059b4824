package controller

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/fleet/api"
	"github.com/hvpatch/hvpatch/internal/kubetest"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

func TestPlanWaves(t *testing.T) {
	nodes := []string{"n5", "n1", "n3", "n2", "n4"}
	for _, c := range []struct {
		s    api.Strategy
		want [][]string
	}{
		{api.Strategy{}, [][]string{{"n1"}, {"n2", "n3", "n4", "n5"}}},
		{api.Strategy{Canary: 2, WaveSize: "2"}, [][]string{{"n1", "n2"}, {"n3", "n4"}, {"n5"}}},
		{api.Strategy{WaveSize: "40%"}, [][]string{{"n1"}, {"n2", "n3"}, {"n4", "n5"}}},
		{api.Strategy{Canary: 9}, [][]string{{"n1", "n2", "n3", "n4", "n5"}}},
	} {
		got, err := PlanWaves(nodes, c.s)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("PlanWaves(%+v) = %v %v, want %v", c.s, got, err, c.want)
		}
	}
	if _, err := PlanWaves(nodes, api.Strategy{WaveSize: "0%"}); err == nil {
		t.Error("waveSize 0% accepted")
	}
}

// fakeAgents stands in for the node agents: every release not acted on
// gets a status with vmsPerNode VMs, Failed on the nodes in fail.
type fakeAgents struct {
	c          client.Client
	vmsPerNode int
	mu         sync.Mutex
	fail       map[string]string
	writes     int
}

func (f *fakeAgents) run(ctx context.Context) {
	for ctx.Err() == nil {
		var list api.HotPatchNodeList
		if err := f.c.List(ctx, &list); err == nil {
			for i := range list.Items {
				n := &list.Items[i]
				if nodeDone(n) {
					continue
				}
				f.mu.Lock()
				reason := f.fail[n.Spec.Node]
				f.mu.Unlock()
				var vms []api.VMStatus
				for v := 0; v < f.vmsPerNode; v++ {
					st := api.VMStatus{Name: fmt.Sprintf("%s-vm%d", n.Spec.Node, v), State: api.VMApplied, Since: metav1.Now()}
					switch {
					case n.Spec.Action == api.ActionRevert:
						st.State = api.VMReverted
					case reason != "" && v == 0:
						st.State, st.Reason = api.VMFailed, reason
					}
					vms = append(vms, st)
				}
				n.Status = api.HotPatchNodeStatus{ObservedGeneration: n.Generation, Action: n.Spec.Action, VMs: vms, Counts: api.Count(vms)}
				if f.c.Status().Update(ctx, n) == nil {
					f.mu.Lock()
					f.writes++
					f.mu.Unlock()
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func startController(t *testing.T, cfg *rest.Config) (*Reconciler, context.CancelFunc) {
	skip := true // a restarted controller in the same process
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: Scheme(), Metrics: metricsserver.Options{BindAddress: "0"},
		Controller: config.Controller{SkipNameValidation: &skip}})
	if err != nil {
		t.Fatal(err)
	}
	r := &Reconciler{Client: mgr.GetClient(), Resync: 2 * time.Second, MinStatusInterval: 200 * time.Millisecond}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); mgr.Start(ctx) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return r, stop
}

func waitPhase(t *testing.T, c client.Client, name, phase string, timeout time.Duration) *api.HotPatch {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var hp api.HotPatch
	for time.Now().Before(deadline) {
		if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &hp); err == nil && hp.Status.Phase == phase {
			return &hp
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("HotPatch %s not %s within %v: status %+v", name, phase, timeout, hp.Status)
	return nil
}

func waitFor(t *testing.T, c client.Client, name string, timeout time.Duration, ok func(*api.HotPatch) bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var hp api.HotPatch
	for time.Now().Before(deadline) {
		if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &hp); err == nil && ok(&hp) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("HotPatch %s: condition not met within %v: status %+v", name, timeout, hp.Status)
}

func hotPatch(name string, s api.Strategy) *api.HotPatch {
	return &api.HotPatch{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: api.HotPatchSpec{
		Bundle:   &api.Bundle{Patch: "id: x\n", Signature: "sig"},
		Selector: api.Selector{Domains: []string{"*"}},
		Strategy: s,
	}}
}

// TestRolloutAgainstAPIServer runs the controller against a real etcd and
// kube-apiserver with stand-in agents: waves in order with the pause,
// pause/resume, a controller restart mid-rollout, a halt with the reason
// and a rollback in waves, CRD validation, the printer columns, and the
// API writes the rollout cost.
func TestRolloutAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	k := kubetest.Start(t)
	ctx := context.Background()
	c := k.Client
	for i := 1; i <= 4; i++ {
		if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("node%d", i), Labels: map[string]string{"hvpatch": "yes"}}}); err != nil {
			t.Fatal(err)
		}
	}
	// Validation by the CRD's schema.
	bad := hotPatch("bad", api.Strategy{WaveSize: "0"})
	if err := c.Create(ctx, bad); err == nil || !strings.Contains(err.Error(), "waveSize") {
		t.Errorf("waveSize 0 accepted: %v", err)
	}
	bad = hotPatch("bad2", api.Strategy{})
	bad.Spec.BundleRef = &api.BundleRef{Kind: "ConfigMap", Namespace: "x", Name: "y"}
	if err := c.Create(ctx, bad); err == nil || !strings.Contains(err.Error(), "exactly one of bundle and bundleRef") {
		t.Errorf("bundle and bundleRef both accepted: %v", err)
	}

	agents := &fakeAgents{c: c, vmsPerNode: 50, fail: map[string]string{}}
	actx, stopAgents := context.WithCancel(ctx)
	defer stopAgents()
	go agents.run(actx)
	r, stop := startController(t, k.Config)

	// canary node1, then waves of 2 (node2+node3), then node4; 1 s pause.
	start := time.Now()
	hp := hotPatch("cve-1", api.Strategy{Canary: 1, WaveSize: "2", Pause: metav1.Duration{Duration: time.Second}, FailureBudget: 0})
	hp.Spec.Selector.NodeSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"hvpatch": "yes"}}
	hp.Spec.Paused = true
	if err := c.Create(ctx, hp); err != nil {
		t.Fatal(err)
	}
	// Paused from the start: nothing is released.
	got := waitPhase(t, c, "cve-1", api.PhasePaused, 20*time.Second)
	if got.Status.Released != 0 || got.Status.Waves != 3 || got.Status.Nodes != 4 {
		t.Fatalf("paused: %+v", got.Status)
	}
	got.Spec.Paused = false
	if err := c.Update(ctx, got); err != nil {
		t.Fatal(err)
	}
	// Restart the controller once the canary is done (in its pause).
	waitFor(t, c, "cve-1", 20*time.Second, func(hp *api.HotPatch) bool { return hp.Status.Counts.Applied == 50 })
	stop()
	first := r.WriteCounts()
	r, _ = startController(t, k.Config)
	got = waitPhase(t, c, "cve-1", api.PhaseComplete, 30*time.Second)
	if got.Status.Counts != (api.VMCounts{Total: 200, Applied: 200}) || got.Status.Released != 4 || got.Status.Wave != 2 {
		t.Fatalf("complete: %+v", got.Status)
	}
	checkConditions(t, got, api.ConditionComplete, api.PhaseComplete)
	var nodes api.HotPatchNodeList
	c.List(ctx, &nodes, client.MatchingLabels{api.LabelHotPatch: "cve-1"})
	waveOf := map[string]int{}
	created := map[string]time.Time{}
	for _, n := range nodes.Items {
		waveOf[n.Spec.Node] = n.Spec.Wave
		created[n.Spec.Node] = n.CreationTimestamp.Time
	}
	if !reflect.DeepEqual(waveOf, map[string]int{"node1": 0, "node2": 1, "node3": 1, "node4": 2}) {
		t.Errorf("waves %v", waveOf)
	}
	t.Logf("4 nodes x 50 VMs, 3 waves, 1 s pauses: complete in %v; controller writes %v before its restart, %v after; agent status writes %d",
		time.Since(start).Round(time.Millisecond), first, r.WriteCounts(), agents.writes)
	if raw, err := rawTable(k.Config); err == nil {
		t.Logf("kubectl get hotpatches (as a Table): %.600s", raw)
	}

	// kubectl get hotpatches: the printer columns, as a Table.
	raw, err := rawTable(k.Config)
	if err != nil {
		t.Fatal(err)
	}
	for _, col := range []string{`"Phase"`, `"Wave"`, `"Applied"`, `"Failed"`, `"Complete"`} {
		if !strings.Contains(raw, col) {
			t.Errorf("table of hotpatches lacks %s:\n%s", col, raw)
		}
	}

	// A failed gate on node2 halts the rollout with the reason; node3 and
	// node4 are never released; rollback reverts node1 then node2.
	agents.mu.Lock()
	agents.fail["node2"] = "gate noOops: the guest kernel's taint mask gained 0x80"
	agents.mu.Unlock()
	hp2 := hotPatch("cve-2", api.Strategy{Canary: 1, WaveSize: "1"})
	if err := c.Create(ctx, hp2); err != nil {
		t.Fatal(err)
	}
	got = waitPhase(t, c, "cve-2", api.PhaseHalted, 30*time.Second)
	if got.Status.Released != 2 || got.Status.Counts.Failed != 1 || len(got.Status.Failures) != 1 ||
		!strings.Contains(got.Status.Message, "taint mask") || got.Status.Failures[0].Node != "node2" {
		t.Fatalf("halted: %+v", got.Status)
	}
	checkConditions(t, got, api.ConditionHalted, api.PhaseHalted)
	if c := meta.FindStatusCondition(got.Status.Conditions, api.ConditionHalted); c == nil || !strings.Contains(c.Message, "taint mask") {
		t.Errorf("halted condition %+v lacks the gate's reason", c)
	}
	time.Sleep(time.Second)
	c.Get(ctx, client.ObjectKey{Name: "cve-2"}, got)
	if got.Status.Released != 2 {
		t.Fatalf("a halted rollout released more nodes: %+v", got.Status)
	}
	got.Spec.Rollback = true
	if err := c.Update(ctx, got); err != nil {
		t.Fatal(err)
	}
	got = waitPhase(t, c, "cve-2", api.PhaseRolledBack, 30*time.Second)
	if got.Status.Counts.Reverted != 100 || got.Status.Counts.Applied != 0 {
		t.Fatalf("rolled back: %+v", got.Status)
	}
	checkConditions(t, got, api.ConditionComplete, api.PhaseRolledBack)
}

// checkConditions: exactly the condition on is True, with the phase as its
// reason, and the others are False.
func checkConditions(t *testing.T, hp *api.HotPatch, on, reason string) {
	t.Helper()
	for _, typ := range []string{api.ConditionProgressing, api.ConditionHalted, api.ConditionComplete} {
		c := meta.FindStatusCondition(hp.Status.Conditions, typ)
		switch {
		case c == nil:
			t.Errorf("%s: no condition %s in %+v", hp.Name, typ, hp.Status.Conditions)
		case (typ == on) != (c.Status == metav1.ConditionTrue) || c.Reason != reason || c.ObservedGeneration != hp.Generation:
			t.Errorf("%s: condition %+v (want %s True, reason %s)", hp.Name, *c, on, reason)
		}
	}
}

func rawTable(cfg *rest.Config) (string, error) {
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return "", err
	}
	req, _ := http.NewRequest("GET", strings.TrimSuffix(cfg.Host, "/")+"/apis/hvpatch.io/v1alpha1/hotpatches", nil)
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
