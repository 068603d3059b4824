package buildinfo

import (
	"runtime/debug"
	"strings"
	"testing"
)

func TestString(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/hvpatch/hvpatch", Version: "v1.2.3"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.modified", Value: "true"}, {Key: "vcs.time", Value: "2026-01-02T03:04:05Z"}}}
	got := fromBuildInfo(bi, true).String()
	if want := "v1.2.3 (revision 0123abcd+modified, 2026-01-02T03:04:05Z, go1.26.8)"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	got = fromBuildInfo(&debug.BuildInfo{Main: debug.Module{Path: "m"}}, true).String()
	if !strings.HasPrefix(got, "(devel) (no VCS revision") {
		t.Errorf("no version, no VCS: %q", got)
	}
	if got := fromBuildInfo(nil, false).Version; got != "unknown" {
		t.Errorf("no build info: %q", got)
	}
	if Read().Version == "" {
		t.Error("Read: empty version")
	}
}
