package patcher

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
