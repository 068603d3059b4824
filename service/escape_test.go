package service

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestEscape(t *testing.T) {
	for in, want := range map[string]string{
		"bash":                    "bash",
		"kworker/0:1H":            "kworker/0:1H",
		"a\nb":                    `a\nb`,
		"\x1b[2J\x1b]0;x\x07":     `\x1b[2J\x1b]0;x\x07`,
		"tab\there\r":             `tab\there\r`,
		`back\slash`:              `back\\slash`,
		"\x7f\xff\xc3":            `\x7f\xff\xc3`,
		"caf\u00e9 \u202eevil":    `café \u202eevil`,
		"\u0085next\u2028line":    `\u0085next\u2028line`,
		"Linux version 6.1.0 (x)": "Linux version 6.1.0 (x)",
	} {
		if got := Escape(in); got != want {
			t.Errorf("Escape(%q) = %q, want %q", in, got, want)
		}
	}
}

// Task names, module names and the banner were printed raw: a guest
// could forge a ps row or a "Release:" line, or send terminal escapes.
func TestTextOutputEscapesGuestStrings(t *testing.T) {
	evil := "x\n0    0    R  forged  0xffff\x1b[2J"
	var b bytes.Buffer
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(Tasks{{PID: 1, Comm: evil, State: "S", Task: "0x1"}}.WriteText(&b))
	must(Modules{{Name: evil, Size: 1, Base: "0x2"}}.WriteText(&b))
	must(Info{Release: "6.1\nRelease: 9.9", Banner: evil}.WriteText(&b))
	must(SymLookup{Symbols: []SymbolInfo{{Name: evil, Addr: "0x3", Type: "T", Module: evil, Aliases: []string{evil}}}}.WriteText(&b))
	must(SymbolList{{Name: evil, Addr: "0x3", Type: "\n", Module: evil}}.WriteText(&b))
	must(Listing{Insts: []Inst{{Addr: "0x4", Where: evil, Bytes: "90", Text: "call " + evil}}}.WriteText(&b))
	must(Status{Domain: "d", Release: evil}.WriteText(&b))
	out := b.String()
	if strings.ContainsAny(out, "\x1b\r") {
		t.Errorf("terminal escapes in the output:\n%s", out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "0    0") || strings.HasPrefix(line, "Release: 9.9") {
			t.Errorf("forged line %q in:\n%s", line, out)
		}
	}
	// JSON keeps the guest's bytes, escaped by encoding/json.
	js, _ := json.Marshal(Task{Comm: evil})
	var back Task
	if err := json.Unmarshal(js, &back); err != nil || back.Comm != evil || bytes.ContainsAny(js, "\n\x1b") {
		t.Errorf("JSON %s", js)
	}
}

func TestEscapeControls(t *testing.T) {
	if got := EscapeControls("task \"a\\nb\" (\x1b[31mred)\u202e"); got != `task "a\nb" (\x1b[31mred)\u202e` {
		t.Errorf("EscapeControls = %q", got)
	}
}
