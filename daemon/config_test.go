package daemon

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func flags(t *testing.T, args ...string) *pflag.FlagSet {
	t.Helper()
	fs := pflag.NewFlagSet("hvpatchd", pflag.ContinueOnError)
	Flags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return fs
}

// The shipped configs/hvpatchd.yaml parses and states exactly the defaults.
func TestShippedConfigIsTheDefaults(t *testing.T) {
	withFile, err := LoadConfig(flags(t, "--config", "../configs/hvpatchd.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defaults, err := LoadConfig(flags(t, "--config", writeFile(t, "{}\n")))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(withFile, defaults) {
		t.Fatalf("configs/hvpatchd.yaml differs from the built-in defaults:\nfile:     %+v\ndefaults: %+v", *withFile, *defaults)
	}
}

func writeFile(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(p, []byte(content), 0o644)
	return p
}

func TestPrecedence(t *testing.T) {
	file := writeFile(t, "state_dir: /from/file\npatch_dir: /p/file\nreconcile:\n  interval: 5s\n")
	t.Setenv("HVPATCHD_PATCH_DIR", "/p/env")
	t.Setenv("HVPATCHD_API_SOCKET", "/s/env")
	cfg, err := LoadConfig(flags(t, "--config", file, "--api-socket", "/s/flag"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != "/from/file" || cfg.PatchDir != "/p/env" || cfg.API.Socket != "/s/flag" || cfg.Reconcile.Interval != 5*time.Second {
		t.Fatalf("precedence wrong: %+v", cfg)
	}
}

func TestBadConfigRefused(t *testing.T) {
	for content, want := range map[string]string{
		"writer: magic\n":                  "writer",
		"api:\n  mode: \"rw\"\n":           "api.mode",
		"api:\n  tcp:\n    addr: \":1\"\n": "clients with certificates",
		"no_such_key: 1\n":                 "no_such_key",
		"log:\n  format: xml\n":            "log.format",
		"reconcile:\n  max_backoff: 1s\n":  "max_backoff",
		"libvirt: [not, a, map]\n":         "libvirt",
	} {
		_, err := LoadConfig(flags(t, "--config", writeFile(t, content)))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: error %v, want it to mention %q", content, err, want)
		}
	}
	if _, err := LoadConfig(flags(t, "--config", "/nonexistent/hvpatchd.yaml")); err == nil {
		t.Error("an explicit missing config file was accepted")
	}
}

// hvpatchd's writer setting takes the CLI's writer names (one vocabulary,
// hypervisor.ParseWriter), in canonical form.
func TestConfigWriterNames(t *testing.T) {
	for in, want := range map[string]string{"auto": "auto", "gdbstub": "gdbstub", "direct+ptrace": "direct+ptrace", "Direct+Suspend": "direct+suspend"} {
		cfg, err := LoadConfig(flags(t, "--writer", in))
		if err != nil || cfg.Writer != want {
			t.Errorf("--writer %s: %v, writer %q, want %q", in, err, cfg.Writer, want)
		}
	}
	_, err := LoadConfig(flags(t, "--config", writeFile(t, "writer: direct\n")))
	if err == nil || !strings.Contains(err.Error(), "direct+ptrace or direct+suspend") {
		t.Errorf("writer: direct: %v, want a hint at the two direct writers", err)
	}
}
