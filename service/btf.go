package service

import (
	"bytes"
	"fmt"
	"io"

	"github.com/hvpatch/hvpatch/cheader"
	"github.com/hvpatch/hvpatch/introspect"
)

// BTFHeader is the answer to "btf --format c": a C header of the guest
// kernel's own types, made from its BTF.
type BTFHeader struct {
	Source  string `json:"source"`
	Release string `json:"release"`
	Types   int    `json:"types"`
	Funcs   int    `json:"funcs"`
	Header  string `json:"header"`
}

// WriteText writes the header itself.
func (h BTFHeader) WriteText(w io.Writer) error {
	_, err := io.WriteString(w, h.Header)
	return err
}

// BTFC makes the header of k's BTF: every type, or with types the named
// types and functions and what they need.
func BTFC(source string, k *introspect.Kernel, types []string) (BTFHeader, error) {
	if k.BTF == nil {
		return BTFHeader{}, fmt.Errorf("%s: the guest kernel (%s) has no BTF", source, k.Release)
	}
	var b bytes.Buffer
	st, err := cheader.Write(&b, k.BTF, cheader.Options{Types: types,
		Comment: fmt.Sprintf("%s: %s", source, k.Banner)})
	if err != nil {
		return BTFHeader{}, fmt.Errorf("%s: %w", source, err)
	}
	return BTFHeader{Source: source, Release: k.Release, Types: st.Types, Funcs: st.Funcs, Header: b.String()}, nil
}
