// Package controller is the fleet rollout controller (controller-runtime):
// it plans a HotPatch's waves over the selected nodes (canary first, then
// waves of strategy.waveSize), releases a wave by creating one
// HotPatchNode per node of it, waits until every node's agent reported,
// halts when more VMs failed than the failure budget allows, waits the
// pause between waves, honours spec.paused, and on spec.rollback turns
// every release into a revert, wave by wave. All its state is in the API
// (HotPatchNode specs and the HotPatch status), so a restarted controller
// resumes where it was.
package controller

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hvpatch/hvpatch/fleet/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
)

// MaxFailures bounds the failures listed in a HotPatch's status.
const MaxFailures = 20

// Reconciler advances HotPatch rollouts.
type Reconciler struct {
	client.Client
	// MinStatusInterval coalesces status writes that only change counts
	// (phase changes are written at once); default 2 s.
	MinStatusInterval time.Duration
	// Resync is how often a HotPatch is looked at without an event
	// (nodes added, pause elapsed); default 30 s.
	Resync time.Duration
	// Now is the clock (tests).
	Now func() time.Time

	mu        sync.Mutex
	lastWrite map[string]time.Time
	// Writes counts the controller's API writes by kind (creates, spec
	// updates, status updates).
	Writes map[string]int
}

// Scheme has the types the controller uses.
func Scheme() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := api.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}

// SetupWithManager registers the controller: HotPatch events, and the
// HotPatchNode objects it owns (an agent's report wakes its HotPatch).
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.MinStatusInterval == 0 {
		r.MinStatusInterval = 2 * time.Second
	}
	if r.Resync == 0 {
		r.Resync = 30 * time.Second
	}
	if r.Now == nil {
		r.Now = time.Now
	}
	r.lastWrite = map[string]time.Time{}
	r.Writes = map[string]int{}
	return ctrl.NewControllerManagedBy(mgr).For(&api.HotPatch{}).Owns(&api.HotPatchNode{}).Named("hotpatch").Complete(r)
}

func (r *Reconciler) wrote(kind string) {
	r.mu.Lock()
	r.Writes[kind]++
	r.mu.Unlock()
}

// WriteCounts returns a copy of the write counters.
func (r *Reconciler) WriteCounts() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for k, v := range r.Writes {
		out[k] = v
	}
	return out
}

// PlanWaves splits the nodes (sorted by name) into the canary wave and the
// following waves.
func PlanWaves(nodes []string, s api.Strategy) ([][]string, error) {
	nodes = append([]string(nil), nodes...)
	sort.Strings(nodes)
	if len(nodes) == 0 {
		return nil, nil
	}
	canary := s.Canary
	if canary == 0 {
		canary = 1
	}
	canary = min(canary, len(nodes))
	waves := [][]string{nodes[:canary]}
	rest := nodes[canary:]
	size := len(rest)
	if ws := s.WaveSize; ws != "" {
		if pct, ok := strings.CutSuffix(ws, "%"); ok {
			p, err := strconv.Atoi(pct)
			if err != nil || p < 1 || p > 100 {
				return nil, fmt.Errorf("waveSize %q: want N or 1%%-100%%", ws)
			}
			size = (len(nodes)*p + 99) / 100
		} else {
			n, err := strconv.Atoi(ws)
			if err != nil || n < 1 {
				return nil, fmt.Errorf("waveSize %q: want N or 1%%-100%%", ws)
			}
			size = n
		}
	}
	for len(rest) > 0 {
		n := min(max(size, 1), len(rest))
		waves = append(waves, rest[:n])
		rest = rest[n:]
	}
	return waves, nil
}

// selectedNodes lists the node names the selector picks.
func (r *Reconciler) selectedNodes(ctx context.Context, sel api.Selector) ([]string, error) {
	var list corev1.NodeList
	opts := []client.ListOption{}
	if sel.NodeSelector != nil {
		ls, err := metav1.LabelSelectorAsSelector(sel.NodeSelector)
		if err != nil {
			return nil, fmt.Errorf("selector.nodeSelector: %w", err)
		}
		opts = append(opts, client.MatchingLabelsSelector{Selector: ls})
	} else {
		opts = append(opts, client.MatchingLabelsSelector{Selector: labels.Everything()})
	}
	if err := r.List(ctx, &list, opts...); err != nil {
		return nil, err
	}
	named := map[string]bool{}
	for _, n := range sel.Nodes {
		named[n] = true
	}
	var out []string
	for _, n := range list.Items {
		if len(named) == 0 || named[n.Name] {
			out = append(out, n.Name)
		}
	}
	return out, nil
}

// nodeDone: the node's agent has acted on the current release.
func nodeDone(n *api.HotPatchNode) bool {
	return n.Status.ObservedGeneration == n.Generation && n.Status.Action == n.Spec.Action
}

// Reconcile is one look at a HotPatch.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var hp api.HotPatch
	if err := r.Get(ctx, req.NamespacedName, &hp); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !hp.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}
	st := hp.Status.DeepCopy()
	st.ObservedGeneration = hp.Generation
	requeue := r.Resync

	nodes, err := r.selectedNodes(ctx, hp.Spec.Selector)
	if err != nil {
		return ctrl.Result{}, err
	}
	waves, err := PlanWaves(nodes, hp.Spec.Strategy)
	if err != nil {
		st.Phase, st.Message = api.PhaseHalted, err.Error()
		return r.writeStatus(ctx, &hp, st, requeue)
	}
	var list api.HotPatchNodeList
	if err := r.List(ctx, &list, client.MatchingLabels{api.LabelHotPatch: hp.Name}); err != nil {
		return ctrl.Result{}, err
	}
	released := map[string]*api.HotPatchNode{}
	byWave := map[int][]*api.HotPatchNode{}
	last := -1
	for i := range list.Items {
		n := &list.Items[i]
		released[n.Spec.Node] = n
		byWave[n.Spec.Wave] = append(byWave[n.Spec.Wave], n)
		last = max(last, n.Spec.Wave)
	}
	// Counts and failures over every released node.
	st.Counts = api.VMCounts{}
	st.Failures = nil
	names := make([]string, 0, len(released))
	for name := range released {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		n := released[name]
		c := n.Status.Counts
		st.Counts.Total += c.Total
		st.Counts.Pending += c.Pending
		st.Counts.Applied += c.Applied
		st.Counts.Failed += c.Failed
		st.Counts.Reverted += c.Reverted
		st.Counts.Skipped += c.Skipped
		for _, v := range n.Status.VMs {
			if v.State == api.VMFailed && len(st.Failures) < MaxFailures {
				st.Failures = append(st.Failures, api.Failure{Node: name, VM: v.Name, Reason: v.Reason})
			}
		}
	}
	st.Nodes, st.Waves, st.Released, st.Wave = len(nodes), len(waves), len(released), max(last, 0)
	waveDone := func(w int) bool {
		for _, n := range byWave[w] {
			if !nodeDone(n) {
				return false
			}
		}
		return true
	}

	if hp.Spec.Rollback {
		// Revert wave by wave, in release order: a wave's nodes are
		// switched to Revert once the previous wave reverted.
		st.Phase, st.Message = api.PhaseRolledBack, "reverted on every released node"
		for w := 0; w <= last; w++ {
			var toRevert []*api.HotPatchNode
			for _, n := range byWave[w] {
				if n.Spec.Action != api.ActionRevert {
					toRevert = append(toRevert, n)
				}
			}
			if len(toRevert) > 0 {
				for _, n := range toRevert {
					n.Spec.Action = api.ActionRevert
					n.Spec.HotPatchGeneration = hp.Generation
					if err := r.Update(ctx, n); err != nil {
						return ctrl.Result{}, err
					}
					r.wrote("hotpatchnode_update")
				}
				st.Phase, st.Message = api.PhaseRollingBack, fmt.Sprintf("reverting wave %d (%d nodes)", w, len(toRevert))
				break
			}
			if !waveDone(w) {
				st.Phase, st.Message = api.PhaseRollingBack, fmt.Sprintf("reverting wave %d", w)
				break
			}
		}
		return r.writeStatus(ctx, &hp, st, requeue)
	}

	budget := hp.Spec.Strategy.FailureBudget
	switch {
	case len(waves) == 0:
		st.Phase, st.Message = api.PhaseProgressing, "no node selected"
	case st.Counts.Failed > budget:
		st.Phase = api.PhaseHalted
		st.Message = fmt.Sprintf("halted: %d VMs failed, failure budget %d", st.Counts.Failed, budget)
		if len(st.Failures) > 0 {
			f := st.Failures[0]
			st.Message += fmt.Sprintf("; %s/%s: %s", f.Node, f.VM, f.Reason)
		}
	case last >= 0 && !waveDone(last):
		st.Phase = api.PhaseProgressing
		st.Message = fmt.Sprintf("wave %d of %d: waiting for %d nodes", last, len(waves), countNotDone(byWave[last]))
	case last == len(waves)-1 && allReleased(waves, released):
		st.Phase, st.Message = api.PhaseComplete, fmt.Sprintf("applied on %d VMs of %d nodes", st.Counts.Applied, len(released))
	case hp.Spec.Paused:
		st.Phase, st.Message = api.PhasePaused, fmt.Sprintf("paused: %d of %d waves released", last+1, len(waves))
	default:
		next := last + 1
		if last >= 0 {
			now := r.Now()
			if st.WaveDoneAt == nil {
				t := metav1.NewTime(now)
				st.WaveDoneAt = &t
			}
			if wait := st.WaveDoneAt.Add(hp.Spec.Strategy.Pause.Duration).Sub(now); wait > 0 {
				st.Phase, st.Message = api.PhaseProgressing, fmt.Sprintf("wave %d done; next wave in %v", last, wait.Round(time.Second))
				requeue = min(requeue, wait)
				break
			}
		}
		if next >= len(waves) {
			next = len(waves) - 1 // nodes added to the plan's last wave
		}
		n, err := r.release(ctx, &hp, waves[next], next, released)
		if err != nil {
			return ctrl.Result{}, err
		}
		st.WaveDoneAt = nil
		st.Wave, st.Released = next, len(released)+n
		st.Phase, st.Message = api.PhaseProgressing, fmt.Sprintf("wave %d of %d released to %d nodes", next, len(waves), n)
	}
	return r.writeStatus(ctx, &hp, st, requeue)
}

func countNotDone(ns []*api.HotPatchNode) int {
	k := 0
	for _, n := range ns {
		if !nodeDone(n) {
			k++
		}
	}
	return k
}

func allReleased(waves [][]string, released map[string]*api.HotPatchNode) bool {
	for _, w := range waves {
		for _, n := range w {
			if released[n] == nil {
				return false
			}
		}
	}
	return true
}

// release creates the HotPatchNode of every node of the wave not yet
// released.
func (r *Reconciler) release(ctx context.Context, hp *api.HotPatch, nodes []string, wave int, released map[string]*api.HotPatchNode) (int, error) {
	k := 0
	for _, node := range nodes {
		if released[node] != nil {
			continue
		}
		n := &api.HotPatchNode{
			ObjectMeta: metav1.ObjectMeta{Name: api.NodeObjectName(hp.Name, node),
				Labels: map[string]string{api.LabelHotPatch: hp.Name, api.LabelNode: node}},
			Spec: api.HotPatchNodeSpec{HotPatch: hp.Name, Node: node, Action: api.ActionApply, Wave: wave, HotPatchGeneration: hp.Generation},
		}
		if err := controllerutil.SetControllerReference(hp, n, r.Scheme()); err != nil {
			return k, err
		}
		if err := r.Create(ctx, n); err != nil && !apierrors.IsAlreadyExists(err) {
			return k, err
		}
		r.wrote("hotpatchnode_create")
		k++
	}
	return k, nil
}

// writeStatus writes the status when it changed: at once when the phase
// or the wave changed, otherwise at most every MinStatusInterval.
func (r *Reconciler) writeStatus(ctx context.Context, hp *api.HotPatch, st *api.HotPatchStatus, requeue time.Duration) (ctrl.Result, error) {
	setConditions(st, hp.Generation)
	if equality.Semantic.DeepEqual(&hp.Status, st) {
		return ctrl.Result{RequeueAfter: requeue}, nil
	}
	key := hp.Name
	now := r.Now()
	if st.Phase == hp.Status.Phase && st.Wave == hp.Status.Wave && st.Released == hp.Status.Released &&
		st.ObservedGeneration == hp.Status.ObservedGeneration && (st.WaveDoneAt == nil) == (hp.Status.WaveDoneAt == nil) {
		r.mu.Lock()
		last := r.lastWrite[key]
		r.mu.Unlock()
		if wait := last.Add(r.MinStatusInterval).Sub(now); wait > 0 {
			return ctrl.Result{RequeueAfter: wait}, nil
		}
	}
	hp.Status = *st
	if err := r.Status().Update(ctx, hp); err != nil {
		return ctrl.Result{}, err
	}
	r.wrote("hotpatch_status")
	r.mu.Lock()
	r.lastWrite[key] = now
	r.mu.Unlock()
	return ctrl.Result{RequeueAfter: requeue}, nil
}

// setConditions sets the standard conditions from the phase, so that
// `kubectl wait --for=condition=Complete hotpatch/NAME` and generic
// tooling (Argo CD, kstatus) follow a rollout: Progressing while waves or
// a rollback advance, Halted when a gate or the failure budget stopped it,
// Complete when it is applied everywhere selected or rolled back.
func setConditions(st *api.HotPatchStatus, gen int64) {
	phase := st.Phase
	if phase == "" {
		return
	}
	set := func(typ string, on bool) {
		c := metav1.Condition{Type: typ, Status: metav1.ConditionFalse, Reason: phase, Message: st.Message, ObservedGeneration: gen}
		if on {
			c.Status = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, c)
	}
	set(api.ConditionProgressing, phase == api.PhaseProgressing || phase == api.PhaseRollingBack)
	set(api.ConditionHalted, phase == api.PhaseHalted)
	set(api.ConditionComplete, phase == api.PhaseComplete || phase == api.PhaseRolledBack)
}
