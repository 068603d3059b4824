package api

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// Deep copies, written by hand (the types are few and small).

// DeepCopyInto copies b into out.
func (b *Bundle) DeepCopyInto(out *Bundle) {
	*out = *b
	if b.Objects != nil {
		out.Objects = make(map[string]string, len(b.Objects))
		for k, v := range b.Objects {
			out.Objects[k] = v
		}
	}
}

// DeepCopyInto copies s into out.
func (s *Selector) DeepCopyInto(out *Selector) {
	*out = *s
	out.Nodes = append([]string(nil), s.Nodes...)
	out.Domains = append([]string(nil), s.Domains...)
	out.VMNamespaces = append([]string(nil), s.VMNamespaces...)
	out.KernelReleases = append([]string(nil), s.KernelReleases...)
	if s.NodeSelector != nil {
		out.NodeSelector = s.NodeSelector.DeepCopy()
	}
}

// DeepCopyInto copies s into out.
func (s *HotPatchSpec) DeepCopyInto(out *HotPatchSpec) {
	*out = *s
	if s.Bundle != nil {
		out.Bundle = new(Bundle)
		s.Bundle.DeepCopyInto(out.Bundle)
	}
	if s.BundleRef != nil {
		r := *s.BundleRef
		out.BundleRef = &r
	}
	s.Selector.DeepCopyInto(&out.Selector)
}

// DeepCopyInto copies s into out.
func (s *HotPatchStatus) DeepCopyInto(out *HotPatchStatus) {
	*out = *s
	if s.WaveDoneAt != nil {
		out.WaveDoneAt = s.WaveDoneAt.DeepCopy()
	}
	out.Failures = append([]Failure(nil), s.Failures...)
	if s.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(s.Conditions))
		for i := range s.Conditions {
			s.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
}

// DeepCopyInto copies h into out.
func (h *HotPatch) DeepCopyInto(out *HotPatch) {
	*out = *h
	h.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	h.Spec.DeepCopyInto(&out.Spec)
	h.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a copy of h.
func (h *HotPatch) DeepCopy() *HotPatch {
	if h == nil {
		return nil
	}
	out := new(HotPatch)
	h.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (h *HotPatch) DeepCopyObject() runtime.Object { return h.DeepCopy() }

// DeepCopyObject implements runtime.Object.
func (l *HotPatchList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := &HotPatchList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	if l.Items != nil {
		out.Items = make([]HotPatch, len(l.Items))
		for i := range l.Items {
			l.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopyInto copies n into out.
func (n *HotPatchNode) DeepCopyInto(out *HotPatchNode) {
	*out = *n
	n.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	if n.Status.VMs != nil {
		out.Status.VMs = make([]VMStatus, len(n.Status.VMs))
		for i, v := range n.Status.VMs {
			out.Status.VMs[i] = v
			v.Since.DeepCopyInto(&out.Status.VMs[i].Since)
		}
	}
}

// DeepCopy returns a copy of n.
func (n *HotPatchNode) DeepCopy() *HotPatchNode {
	if n == nil {
		return nil
	}
	out := new(HotPatchNode)
	n.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (n *HotPatchNode) DeepCopyObject() runtime.Object { return n.DeepCopy() }

// DeepCopyObject implements runtime.Object.
func (l *HotPatchNodeList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := &HotPatchNodeList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	if l.Items != nil {
		out.Items = make([]HotPatchNode, len(l.Items))
		for i := range l.Items {
			l.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopy returns a copy of s.
func (s *HotPatchStatus) DeepCopy() *HotPatchStatus {
	out := new(HotPatchStatus)
	s.DeepCopyInto(out)
	return out
}
