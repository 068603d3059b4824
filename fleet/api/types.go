// Package api holds the hvpatch.io/v1alpha1 fleet types: HotPatch, a
// signed patch rolled out across a fleet in waves, and HotPatchNode, the
// per-node release and status object (one per HotPatch and node) through
// which the controller releases a wave to a node's agent and the agent
// reports the state of every VM on that node in one write.
//
// deploy/crds holds the CustomResourceDefinitions with their OpenAPI
// schemas, validation and printer columns.
package api

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Group and version of the fleet API.
const (
	Group   = "hvpatch.io"
	Version = "v1alpha1"
)

// GroupVersion is hvpatch.io/v1alpha1.
var GroupVersion = schema.GroupVersion{Group: Group, Version: Version}

// Labels of HotPatchNode objects: agents watch only their own node's.
const (
	LabelHotPatch = "hvpatch.io/hotpatch"
	LabelNode     = "hvpatch.io/node"
)

// AddToScheme registers the fleet types.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &HotPatch{}, &HotPatchList{}, &HotPatchNode{}, &HotPatchNodeList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}

// HotPatch is one signed patch and how it rolls out (cluster-scoped).
type HotPatch struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              HotPatchSpec   `json:"spec"`
	Status            HotPatchStatus `json:"status,omitempty"`
}

// HotPatchSpec is what the operator declares.
type HotPatchSpec struct {
	// Bundle is the signed patch, inline; BundleRef names a ConfigMap or
	// Secret holding it instead. Exactly one is set.
	Bundle    *Bundle    `json:"bundle,omitempty"`
	BundleRef *BundleRef `json:"bundleRef,omitempty"`
	Selector  Selector   `json:"selector"`
	Strategy  Strategy   `json:"strategy,omitempty"`
	// Paused stops releasing further waves; clearing it resumes.
	Paused bool `json:"paused,omitempty"`
	// Rollback reverts the patch everywhere it was released, in waves.
	Rollback bool `json:"rollback,omitempty"`
}

// Bundle is a patch file, its ed25519 signature (hvpatch sign) and the
// objects its replace edits link (path -> base64), pinned by SHA-256 in the
// patch file.
type Bundle struct {
	Patch     string            `json:"patch"`
	Signature string            `json:"signature,omitempty"`
	Objects   map[string]string `json:"objects,omitempty"`
}

// BundleRef names a ConfigMap or Secret with the keys patch.yaml,
// patch.yaml.sig and one key per object (its path with / written as __).
type BundleRef struct {
	Kind      string `json:"kind"` // ConfigMap or Secret
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

// Selector picks the VMs: nodes (names or labels), then on each node the
// libvirt domains (name globs; KubeVirt names them NAMESPACE_NAME) and the
// kernel releases (globs; the patch file's match section still applies).
type Selector struct {
	Nodes          []string              `json:"nodes,omitempty"`
	NodeSelector   *metav1.LabelSelector `json:"nodeSelector,omitempty"`
	Domains        []string              `json:"domains,omitempty"`
	VMNamespaces   []string              `json:"vmNamespaces,omitempty"`
	KernelReleases []string              `json:"kernelReleases,omitempty"`
}

// Strategy is how the rollout advances.
type Strategy struct {
	// Canary is the number of nodes of the first wave (default 1).
	Canary int `json:"canary,omitempty"`
	// WaveSize is the number of nodes per following wave, or a percentage
	// of the selected nodes ("25%"); default: all the rest at once.
	WaveSize string `json:"waveSize,omitempty"`
	// Pause is the time between a wave's completion and the next release.
	Pause metav1.Duration `json:"pause,omitempty"`
	// FailureBudget is the number of failed VMs tolerated; one more halts
	// the rollout.
	FailureBudget int   `json:"failureBudget,omitempty"`
	Gates         Gates `json:"gates,omitempty"`
}

// Gates are checked by the agent on every VM after the apply; a gate that
// fails marks the VM Failed with the gate's reason. Verify (hvpatchd reads
// the patched bytes back and compares them with its journal) is always on.
type Gates struct {
	// GuestAlive: the guest kernel's jiffies advance after the apply.
	GuestAlive bool `json:"guestAlive,omitempty"`
	// NoOops: the guest kernel's taint mask gained no TAINT_DIE (an oops)
	// nor TAINT_WARN since before the apply.
	NoOops bool `json:"noOops,omitempty"`
}

// Phases of a HotPatch.
const (
	PhaseProgressing = "Progressing"
	PhasePaused      = "Paused"
	PhaseHalted      = "Halted"
	PhaseComplete    = "Complete"
	PhaseRollingBack = "RollingBack"
	PhaseRolledBack  = "RolledBack"
)

// Condition types of a HotPatch (Status.Conditions), set from the phase;
// each condition's reason is the phase.
const (
	ConditionProgressing = "Progressing"
	ConditionHalted      = "Halted"
	ConditionComplete    = "Complete"
)

// HotPatchStatus is the controller's view, aggregated from the nodes.
type HotPatchStatus struct {
	ObservedGeneration int64  `json:"observedGeneration,omitempty"`
	Phase              string `json:"phase,omitempty"`
	Message            string `json:"message,omitempty"`
	// Wave is the last wave released (0 is the canary); Waves their number.
	Wave  int `json:"wave"`
	Waves int `json:"waves"`
	// Nodes selected, nodes released, VM counts per state.
	Nodes    int      `json:"nodes"`
	Released int      `json:"released"`
	Counts   VMCounts `json:"counts"`
	// WaveDoneAt is when the last released wave finished (its pause runs
	// from there).
	WaveDoneAt *metav1.Time `json:"waveDoneAt,omitempty"`
	// Failures lists failed VMs with their reasons (at most 20).
	Failures   []Failure          `json:"failures,omitempty"`
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// VMCounts counts VMs by state.
type VMCounts struct {
	Total    int `json:"total"`
	Pending  int `json:"pending"`
	Applied  int `json:"applied"`
	Failed   int `json:"failed"`
	Reverted int `json:"reverted"`
	Skipped  int `json:"skipped"`
}

// Failure is one VM that failed, and why.
type Failure struct {
	Node   string `json:"node"`
	VM     string `json:"vm"`
	Reason string `json:"reason"`
}

// HotPatchList is a list of HotPatch.
type HotPatchList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []HotPatch `json:"items"`
}

// Actions the controller releases to a node.
const (
	ActionApply  = "Apply"
	ActionRevert = "Revert"
)

// VM states reported by an agent.
const (
	VMPending  = "Pending"
	VMApplied  = "Applied"
	VMFailed   = "Failed"
	VMReverted = "Reverted"
	VMSkipped  = "Skipped"
)

// HotPatchNode releases a HotPatch to one node (spec, written by the
// controller) and reports that node's VMs (status, written by the agent).
// Named HOTPATCH.NODE, labelled hvpatch.io/hotpatch and hvpatch.io/node.
type HotPatchNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              HotPatchNodeSpec   `json:"spec"`
	Status            HotPatchNodeStatus `json:"status,omitempty"`
}

// HotPatchNodeSpec is the release.
type HotPatchNodeSpec struct {
	HotPatch string `json:"hotPatch"`
	Node     string `json:"node"`
	Action   string `json:"action"` // Apply or Revert
	Wave     int    `json:"wave"`
	// HotPatchGeneration is the HotPatch generation the release is for.
	HotPatchGeneration int64 `json:"hotPatchGeneration"`
}

// HotPatchNodeStatus is the agent's report, written once per change of
// any VM's state (all the node's VMs in one write).
type HotPatchNodeStatus struct {
	// ObservedGeneration is the HotPatchNode generation the agent finished
	// acting on: equal to metadata.generation means done.
	ObservedGeneration int64      `json:"observedGeneration,omitempty"`
	Action             string     `json:"action,omitempty"`
	VMs                []VMStatus `json:"vms,omitempty"`
	Counts             VMCounts   `json:"counts"`
}

// VMStatus is one VM (libvirt domain) on the node.
type VMStatus struct {
	Name   string `json:"name"`
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
	// Kernel is the guest's kernel release.
	Kernel string      `json:"kernel,omitempty"`
	Since  metav1.Time `json:"since,omitzero"`
}

// HotPatchNodeList is a list of HotPatchNode.
type HotPatchNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []HotPatchNode `json:"items"`
}

// NodeObjectName is the HotPatchNode name of a HotPatch on a node.
func NodeObjectName(hotPatch, node string) string { return hotPatch + "." + node }

// Count tallies VM states.
func Count(vms []VMStatus) VMCounts {
	c := VMCounts{Total: len(vms)}
	for _, v := range vms {
		switch v.State {
		case VMPending:
			c.Pending++
		case VMApplied:
			c.Applied++
		case VMFailed:
			c.Failed++
		case VMReverted:
			c.Reverted++
		case VMSkipped:
			c.Skipped++
		}
	}
	return c
}
