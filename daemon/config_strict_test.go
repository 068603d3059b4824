package daemon

import (
	"strings"
	"testing"
	"time"
)

// Durations need units and have minimums; unknown keys, nested too, are
// errors that name the key.
func TestStrictConfig(t *testing.T) {
	for content, want := range map[string][]string{
		"reconcile:\n  interval: 30\n":                    {"interval", "needs a unit"},
		"libvirt:\n  timeout: 10\n":                       {"timeout", "needs a unit"},
		"reconcile:\n  max_backoff: 600\n":                {"max_backoff", "needs a unit"},
		"reconcile:\n  interval: 30x\n":                   {"interval", "want a number with a unit"},
		"reconcile:\n  interval: 500ms\n":                 {"reconcile.interval", "at least 1s"},
		"reconcile:\n  interval: 5s\n  max_backoff: 2s\n": {"reconcile.max_backoff", "at least"},
		"libvirt:\n  timeout: 1ms\n":                      {"libvirt.timeout", "at least"},
		"reconcile:\n  intervall: 5s\n":                   {"intervall"},
		"api:\n  tcp:\n    adress: \":1\"\n":              {"adress"},
		"reconcile:\n  interval: 5s\n  max_backoff: 1h\n": nil,
	} {
		cfg, err := LoadConfig(flags(t, "--config", writeFile(t, content)))
		if want == nil {
			if err != nil || cfg.Reconcile.Interval != 5*time.Second || cfg.Reconcile.MaxBackoff != time.Hour {
				t.Errorf("config %q: %v %+v", content, err, cfg)
			}
			continue
		}
		if err == nil {
			t.Errorf("config %q accepted", content)
			continue
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("config %q: error %q does not mention %q", content, err, w)
			}
		}
	}
}

func TestStrictConfigEnv(t *testing.T) {
	empty := writeFile(t, "{}\n")
	t.Setenv("HVPATCHD_RECONCILE_INTERVAL", "30")
	if _, err := LoadConfig(flags(t, "--config", empty)); err == nil || !strings.Contains(err.Error(), "unit") {
		t.Errorf("HVPATCHD_RECONCILE_INTERVAL=30: %v, want an error asking for a unit", err)
	}
	t.Setenv("HVPATCHD_RECONCILE_INTERVAL", "45s")
	cfg, err := LoadConfig(flags(t, "--config", empty))
	if err != nil || cfg.Reconcile.Interval != 45*time.Second {
		t.Errorf("HVPATCHD_RECONCILE_INTERVAL=45s: %v %+v", err, cfg)
	}
}
