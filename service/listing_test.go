package service

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestDomainsListedLikeVirshList(t *testing.T) {
	ds := Domains{
		{Name: "zeta", ID: -1, State: "shutoff"},
		{Name: "web02", ID: 7, State: "running"},
		{Name: "alpha", ID: -1, State: "shutoff"},
		{Name: "db", ID: 3, State: "paused"},
		{Name: "web01", ID: 12, State: "running"},
	}
	names := func(ds Domains) string {
		var n []string
		for _, d := range ds {
			n = append(n, d.Name)
		}
		return strings.Join(n, " ")
	}
	if got := names(ds.Listed(false)); got != "db web02 web01" {
		t.Errorf("active: %q", got)
	}
	if got := names(ds.Listed(true)); got != "db web02 web01 alpha zeta" {
		t.Errorf("--all: %q", got)
	}
	if got := (Domains{{Name: "x", ID: -1}}).Listed(false); got == nil || len(got) != 0 {
		t.Errorf("none active: %#v, want an empty list (JSON [])", got)
	}
}

func TestAbsentTimesOmitted(t *testing.T) {
	st := Status{Domain: "d", Patches: []PatchStatus{{ID: "p"}}, Declared: []Declared{{File: "f", ID: "p"}}}
	b, _ := json.Marshal(st)
	if strings.Contains(string(b), "0001-01-01") || strings.Contains(string(b), `"time"`) || strings.Contains(string(b), `"since"`) {
		t.Errorf("zero times printed: %s", b)
	}
	var sb strings.Builder
	st.WriteText(&sb)
	if strings.Contains(sb.String(), "0001-01-01") {
		t.Errorf("zero time in text: %s", sb.String())
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	st.Patches[0].Time = at
	b, _ = json.Marshal(st)
	if !strings.Contains(string(b), `"time":"2026-01-02T03:04:05Z"`) {
		t.Errorf("set time not printed: %s", b)
	}
}
