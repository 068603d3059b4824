package hypervisor

import (
	"strings"
	"testing"
)

func TestParseWriter(t *testing.T) {
	ok := map[string]string{
		"":               WriterAuto,
		"auto":           WriterAuto,
		" Auto ":         WriterAuto,
		"gdbstub":        WriterGdbstub,
		"direct+ptrace":  WriterDirectPtrace,
		"DIRECT+SUSPEND": WriterDirectSuspend,
	}
	for in, want := range ok {
		got, err := ParseWriter(in)
		if err != nil || got != want {
			t.Errorf("ParseWriter(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	bad := map[string]string{
		"direct":  "direct+ptrace or direct+suspend",
		"ptrace":  "want one of auto, gdbstub, direct+ptrace, direct+suspend",
		"gdb":     "unknown code writer",
		"suspend": "unknown code writer",
	}
	for in, want := range bad {
		_, err := ParseWriter(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseWriter(%q): %v, want an error containing %q", in, err, want)
		}
	}
	// Every name a writer reports is in the vocabulary, and parses to itself.
	for _, w := range []CodeWriter{&directWriter{freezer: "ptrace"}, &directWriter{freezer: "suspend"}, &gdbWriter{}} {
		if got, err := ParseWriter(w.Name()); err != nil || got != w.Name() || got == WriterAuto {
			t.Errorf("writer %s: ParseWriter gives %q, %v", w.Name(), got, err)
		}
	}
}

// Capabilities, not names, say what a stop allows.
func TestWriterCapabilities(t *testing.T) {
	cases := []struct {
		w         CodeWriter
		registers bool
		outlives  bool
	}{
		{&directWriter{freezer: "ptrace"}, false, false},
		{&directWriter{freezer: "suspend"}, true, true},
		{&gdbWriter{}, true, true},
	}
	for _, c := range cases {
		got := c.w.Capabilities()
		if got.Registers != c.registers || got.OutlivesProcess != c.outlives {
			t.Errorf("%s: %+v", c.w.Name(), got)
		}
	}
	s := &directStopped{regs: false}
	if _, err := s.Registers(t.Context()); err != ErrNoRegisters {
		t.Errorf("registers under a ptrace freeze: %v, want ErrNoRegisters", err)
	}
}
