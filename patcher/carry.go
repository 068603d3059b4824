package patcher

import "fmt"

// A patch may edit the kernel image and a module together (hvpatch build
// makes one from a fix that touches both). When the module is unloaded
// only its part goes (journal state module gone); the kernel image's part
// stays applied, as Linux livepatch keeps vmlinux's part of a patch while
// a module comes and goes. These helpers find that part.

// kernelEdits returns the edits of jp in the kernel image (not in a module).
func kernelEdits(jp *JournalPatch) []JournalEdit {
	var out []JournalEdit
	for _, je := range jp.Edits {
		if je.Module == "" {
			out = append(out, je)
		}
	}
	return out
}

// kernelEditsInPlace maps the address of each kernel image edit of jp
// whose site still holds the patched bytes to that edit. A site that
// cannot be read, or holds anything else, is left out: the apply's plan
// then sees it as it is.
func kernelEditsInPlace(t Target, jp *JournalPatch) map[uint64]JournalEdit {
	in := map[uint64]JournalEdit{}
	for _, je := range kernelEdits(jp) {
		cur := make([]byte, len(je.New))
		if err := t.ReadVirt(je.VA, cur); err == nil && string(cur) == string(je.New) {
			in[je.VA] = je
		}
	}
	return in
}

// KernelPart is p with only its kernel image edits: what is applied while
// a module p edits is not loaded. A patch with no kernel edits, or one that
// supersedes others (its module sites would be left to the old patches),
// has no part to apply alone.
func (p *Patch) KernelPart() (*Patch, error) {
	if len(p.Replaces) > 0 {
		return nil, fmt.Errorf("a patch that replaces others is applied whole")
	}
	kp := *p
	kp.Edits = nil
	for _, e := range p.Edits {
		if e.Module == "" {
			kp.Edits = append(kp.Edits, e)
		}
	}
	if len(kp.Edits) == 0 {
		return nil, fmt.Errorf("the patch has no kernel edits to apply before it")
	}
	return &kp, nil
}
