package main

import (
	"encoding/json"
	"io"

	"github.com/hvpatch/hvpatch/service"
)

// Output prints a command's result as text or, with --json, as one JSON
// document. Commands build a value for JSON and say how to show it as text.
type Output struct {
	w    io.Writer
	JSON bool
}

func NewOutput(w io.Writer, asJSON bool) *Output { return &Output{w: w, JSON: asJSON} }

// Emit writes v as indented JSON, or calls text for the human form.
func (o *Output) Emit(v any, text func(w io.Writer) error) error {
	if o.JSON {
		enc := json.NewEncoder(o.w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	return text(o.w)
}

// Table writes aligned columns under upper-case headers (the one
// renderer the service layer uses too).
func Table(w io.Writer, headers []string, rows [][]string) error {
	return service.Table(w, headers, rows)
}
