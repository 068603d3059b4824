package daemon

// hvpatchd --kubernetes: the node agent of the fleet rollout (fleet/api,
// docs/fleet.md). The agent watches only its own node's HotPatchNode
// objects (label hvpatch.io/node=NODE: the API server filters the watch,
// so one agent sees one node's releases, never the fleet's), and for each
// one applies or reverts the HotPatch's signed bundle on the libvirt
// domains of this node that the HotPatch selects, through the same path as
// the API's apply (signature against the trusted keys, SHA-256 pins of the
// objects, the journal that makes a second apply a no-op), checks the
// gates, and writes the states of all the node's VMs in one status update,
// only when one of them changed.

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/fleet/api"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// KubeAgent is hvpatchd's node agent.
type KubeAgent struct {
	d    *Daemon
	c    client.WithWatch
	node string
	// owned are the libvirt domain name globs of this node (default all).
	owned  []string
	resync time.Duration
	log    *slog.Logger
	// Writes counts the status writes (one per changed HotPatchNode).
	Writes int
}

// NewKubeAgent connects to the API server (kubernetes.kubeconfig, or the
// in-cluster configuration when empty).
func NewKubeAgent(d *Daemon, log *slog.Logger) (*KubeAgent, error) {
	k := d.cfg.Kubernetes
	rc, err := clientcmd.BuildConfigFromFlags("", k.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	rc.UserAgent = "hvpatchd/" + k.Node
	s := runtime.NewScheme()
	if err := api.AddToScheme(s); err != nil {
		return nil, err
	}
	if err := corev1.AddToScheme(s); err != nil {
		return nil, err
	}
	c, err := client.NewWithWatch(rc, client.Options{Scheme: s})
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	owned := k.Domains
	if len(owned) == 0 {
		owned = []string{"*"}
	}
	return &KubeAgent{d: d, c: c, node: k.Node, owned: owned, resync: k.Resync, log: log.With("node", k.Node)}, nil
}

// Run lists this node's releases, acts on them, then watches for changes
// (or the resync interval) and does it again, until ctx is cancelled.
func (a *KubeAgent) Run(ctx context.Context) {
	a.log.Info("kubernetes node agent started", "owned_domains", a.owned, "resync", a.resync)
	backoff := time.Second
	for ctx.Err() == nil {
		rv, err := a.syncAll(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Warn("kubernetes sync", "err", err)
			sleepCtx(ctx, backoff)
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		a.waitChange(ctx, rv)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (a *KubeAgent) selector() client.MatchingLabels {
	return client.MatchingLabels{api.LabelNode: a.node}
}

func (a *KubeAgent) syncAll(ctx context.Context) (string, error) {
	var list api.HotPatchNodeList
	if err := a.c.List(ctx, &list, a.selector()); err != nil {
		return "", err
	}
	sort.Slice(list.Items, func(i, j int) bool { return list.Items[i].Name < list.Items[j].Name })
	for i := range list.Items {
		if err := a.sync(ctx, &list.Items[i]); err != nil {
			if ctx.Err() != nil {
				return "", ctx.Err()
			}
			a.log.Warn("kubernetes: release not done", "hotpatchnode", list.Items[i].Name, "err", err)
		}
	}
	return list.ResourceVersion, nil
}

// waitChange returns when a release of this node changes (a new one, or a
// spec the agent has not acted on), or after the resync interval.
func (a *KubeAgent) waitChange(ctx context.Context, rv string) {
	secs := int64(a.resync / time.Second)
	w, err := a.c.Watch(ctx, &api.HotPatchNodeList{}, a.selector(),
		&client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: rv, TimeoutSeconds: &secs}})
	if err != nil {
		sleepCtx(ctx, time.Second)
		return
	}
	defer w.Stop()
	t := time.NewTimer(a.resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			return
		case ev, ok := <-w.ResultChan():
			if !ok {
				return
			}
			n, isNode := ev.Object.(*api.HotPatchNode)
			switch {
			case ev.Type == watch.Error:
				return
			case !isNode:
			case ev.Type == watch.Added || ev.Type == watch.Modified && !done(n):
				return
			}
		}
	}
}

// done reports whether the agent has finished acting on n's spec.
func done(n *api.HotPatchNode) bool {
	return n.Status.ObservedGeneration == n.Generation && n.Status.Action == n.Spec.Action
}

// sync acts on one release and writes its status when anything changed.
func (a *KubeAgent) sync(ctx context.Context, n *api.HotPatchNode) error {
	var hp api.HotPatch
	if err := a.c.Get(ctx, client.ObjectKey{Name: n.Spec.HotPatch}, &hp); err != nil {
		if apierrors.IsNotFound(err) {
			return nil // deleted: its HotPatchNodes go with it
		}
		return err
	}
	prev := map[string]api.VMStatus{}
	for _, v := range n.Status.VMs {
		prev[v.Name] = v
	}
	doms, err := a.d.conn.Domains(ctx)
	if err != nil {
		return err
	}
	b, berr := a.bundle(ctx, &hp)
	var id string
	if berr == nil {
		p, _, err := ParseForAPI([]byte(b.Patch))
		if err != nil {
			berr = fmt.Errorf("patch file: %w", err)
		} else {
			id = p.ID
		}
	}
	var vms []api.VMStatus
	for _, info := range doms {
		if !a.selects(&hp.Spec.Selector, info.Name) {
			continue
		}
		old, had := prev[info.Name]
		st := api.VMStatus{Name: info.Name, Kernel: old.Kernel}
		switch {
		case berr != nil && n.Spec.Action == api.ActionApply:
			st.State, st.Reason = api.VMFailed, "bundle: "+berr.Error()
		case n.Spec.Action == api.ActionRevert:
			if id == "" {
				p, _, err := ParseForAPI([]byte(b.Patch))
				if err != nil {
					st.State, st.Reason = api.VMFailed, "revert: "+err.Error()
					break
				}
				id = p.ID
			}
			st.State, st.Reason = a.revert(info.Name, id)
		default:
			st.State, st.Reason, st.Kernel = a.apply(ctx, &hp, b, id, info.Name, old)
		}
		if ctx.Err() != nil {
			return ctx.Err() // shutting down: report nothing half done
		}
		st.Since = metav1.Now()
		if had && old.State == st.State && old.Reason == st.Reason {
			st.Since = old.Since
		}
		vms = append(vms, st)
	}
	sort.Slice(vms, func(i, j int) bool { return vms[i].Name < vms[j].Name })
	if done(n) && sameVMs(n.Status.VMs, vms) {
		return nil
	}
	n.Status = api.HotPatchNodeStatus{ObservedGeneration: n.Generation, Action: n.Spec.Action, VMs: vms, Counts: api.Count(vms)}
	if err := a.c.Status().Update(ctx, n); err != nil {
		return err
	}
	a.Writes++
	a.log.Info("kubernetes: node status written", "hotpatchnode", n.Name, "action", n.Spec.Action,
		"applied", n.Status.Counts.Applied, "failed", n.Status.Counts.Failed, "reverted", n.Status.Counts.Reverted, "writes", a.Writes)
	return nil
}

func sameVMs(a, b []api.VMStatus) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Name != b[i].Name || a[i].State != b[i].State || a[i].Reason != b[i].Reason || a[i].Kernel != b[i].Kernel {
			return false
		}
	}
	return true
}

// selects: the domain is this node's and the HotPatch selects it.
func (a *KubeAgent) selects(sel *api.Selector, name string) bool {
	if !matchAny(a.owned, name) {
		return false
	}
	if len(sel.Domains) > 0 && !matchAny(sel.Domains, name) {
		return false
	}
	if len(sel.VMNamespaces) > 0 {
		ns, _, ok := strings.Cut(name, "_") // KubeVirt: NAMESPACE_NAME
		if !ok || !matchAny(sel.VMNamespaces, ns) {
			return false
		}
	}
	return true
}

func matchAny(globs []string, s string) bool {
	for _, g := range globs {
		if ok, _ := path.Match(g, s); ok {
			return true
		}
	}
	return false
}

// bundle reads the HotPatch's signed bundle, inline or from its ConfigMap
// or Secret.
func (a *KubeAgent) bundle(ctx context.Context, hp *api.HotPatch) (*api.Bundle, error) {
	if hp.Spec.Bundle != nil {
		return hp.Spec.Bundle, nil
	}
	r := hp.Spec.BundleRef
	if r == nil {
		return nil, errors.New("neither bundle nor bundleRef")
	}
	data := map[string]string{}
	key := client.ObjectKey{Namespace: r.Namespace, Name: r.Name}
	switch r.Kind {
	case "Secret":
		var s corev1.Secret
		if err := a.c.Get(ctx, key, &s); err != nil {
			return nil, err
		}
		for k, v := range s.Data {
			data[k] = string(v)
		}
	default:
		var cm corev1.ConfigMap
		if err := a.c.Get(ctx, key, &cm); err != nil {
			return nil, err
		}
		for k, v := range cm.Data {
			data[k] = v
		}
		for k, v := range cm.BinaryData {
			data[k] = string(v)
		}
	}
	return BundleFromData(data)
}

// BundleFromData turns the keys of a bundle ConfigMap or Secret into a
// bundle: patch.yaml, patch.yaml.sig, and every other key an object (its
// path with / written as __), carried base64 as the API's apply does.
func BundleFromData(data map[string]string) (*api.Bundle, error) {
	b := &api.Bundle{Patch: data["patch.yaml"], Signature: data["patch.yaml.sig"]}
	if b.Patch == "" {
		return nil, errors.New("bundle has no patch.yaml")
	}
	for k, v := range data {
		if k == "patch.yaml" || k == "patch.yaml.sig" {
			continue
		}
		if b.Objects == nil {
			b.Objects = map[string]string{}
		}
		b.Objects[strings.ReplaceAll(k, "__", "/")] = base64Std(v)
	}
	return b, nil
}

// apply applies the bundle on one domain and checks the gates; it returns
// the VM's state, the reason and the guest's kernel release.
func (a *KubeAgent) apply(ctx context.Context, hp *api.HotPatch, b *api.Bundle, id, name string, old api.VMStatus) (string, string, string) {
	dom, err := a.d.lookup(ctx, name)
	if err != nil {
		return api.VMFailed, err.Error(), old.Kernel
	}
	var release string
	var taintBefore uint64
	gates := hp.Spec.Strategy.Gates
	err = dom.withLive(false, func(ctx context.Context, live *patcher.Live) error {
		release = live.Kernel.Release
		if gates.NoOops {
			var err error
			taintBefore, err = readKernelU64(live, "tainted_mask")
			return err
		}
		return nil
	})
	if err != nil {
		return api.VMPending, err.Error(), old.Kernel
	}
	if rel := hp.Spec.Selector.KernelReleases; len(rel) > 0 && !matchAny(rel, release) {
		return api.VMSkipped, fmt.Sprintf("kernel %s is not one of %s", release, strings.Join(rel, ", ")), release
	}
	res, err := a.d.apiApply(ctx, name, ApplyRequest{File: hp.Name, Patch: b.Patch, Signature: b.Signature, Objects: b.Objects})
	if err != nil {
		var se *statusError
		if errors.As(err, &se) && se.code == 403 {
			return api.VMFailed, "verification: " + err.Error(), release
		}
		return api.VMFailed, "apply: " + err.Error(), release
	}
	if !res.NoOp {
		a.log.Info("kubernetes: patch applied", "hotpatch", hp.Name, "domain", name, "patch", id)
	} else if old.State != api.VMApplied {
		a.log.Info("kubernetes: patch already applied (journal): not applied again", "hotpatch", hp.Name, "domain", name, "patch", id)
	}
	// Gates: hvpatchd's verification of the bytes (always), the guest
	// still running its kernel (jiffies advance), no new oops.
	err = dom.withLive(false, func(ctx context.Context, live *patcher.Live) error {
		st, err := a.d.pt.Reconcile(live.Domain)
		if err != nil {
			return fmt.Errorf("verify: %w", err)
		}
		found := false
		for _, ps := range st.Patches {
			if ps.Entry.ID == id {
				found = true
				if ps.Memory != patcher.MemApplied {
					return fmt.Errorf("verify: guest memory of patch %s is %s, not the patched bytes %s", id, ps.Memory, strings.Join(ps.Details, "; "))
				}
			}
		}
		if !found {
			return fmt.Errorf("verify: patch %s is not in the journal after its apply", id)
		}
		if gates.GuestAlive && !res.NoOp {
			j1, err := readJiffies(live)
			if err != nil {
				return fmt.Errorf("gate guestAlive: %w", err)
			}
			time.Sleep(300 * time.Millisecond)
			j2, err := readJiffies(live)
			if err != nil {
				return fmt.Errorf("gate guestAlive: %w", err)
			}
			if j2 == j1 {
				return fmt.Errorf("gate guestAlive: the guest kernel's jiffies did not advance in 300ms after the apply (%d)", j1)
			}
		}
		if gates.NoOops && !res.NoOp {
			t, err := readKernelU64(live, "tainted_mask")
			if err != nil {
				return fmt.Errorf("gate noOops: %w", err)
			}
			const taintWarn, taintDie = 1 << 9, 1 << 7
			if added := t &^ taintBefore; added&(taintWarn|taintDie) != 0 {
				return fmt.Errorf("gate noOops: the guest kernel's taint mask gained %#x (oops or warning) after the apply", added)
			}
		}
		return nil
	})
	if err != nil {
		return api.VMFailed, err.Error(), release
	}
	return api.VMApplied, "", release
}

// revert reverts patch id on one domain; a domain without it is reverted
// already.
func (a *KubeAgent) revert(name, id string) (string, string) {
	dom, err := a.d.lookup(context.Background(), name)
	if err != nil {
		return api.VMFailed, err.Error()
	}
	reason := ""
	err = dom.withLive(true, func(ctx context.Context, live *patcher.Live) error {
		st, err := a.d.pt.Reconcile(live.Domain)
		if err != nil {
			return err
		}
		in := false
		for _, ps := range st.Patches {
			in = in || ps.Entry.ID == id
		}
		if !in {
			reason = "not applied"
			return nil
		}
		v, res, err := service.Revert(ctx, a.d.pt, live, id)
		a.d.count(a.d.metrics.Reverts, "reverted", res, err)
		if err == nil {
			a.log.Info("kubernetes: patch reverted", "domain", name, "patch", id, "message", v.Message)
		}
		return err
	})
	if err != nil {
		return api.VMFailed, "revert: " + err.Error()
	}
	return api.VMReverted, reason
}

func readKernelU64(live *patcher.Live, sym string) (uint64, error) {
	addr, err := live.Kernel.SymbolAddr(sym)
	if err != nil {
		return 0, err
	}
	var buf [8]byte
	if err := live.Kernel.AS.ReadVirt(addr, buf[:]); err != nil {
		return 0, fmt.Errorf("%s: %w", sym, err)
	}
	return binary.LittleEndian.Uint64(buf[:]), nil
}

func readJiffies(live *patcher.Live) (uint64, error) {
	j, err := readKernelU64(live, "jiffies_64")
	if err != nil {
		return readKernelU64(live, "jiffies")
	}
	return j, nil
}

func base64Std(raw string) string { return base64.StdEncoding.EncodeToString([]byte(raw)) }
