// Package buildinfo says which build of hvpatch is running: the module
// version and the VCS revision the Go toolchain stamped into the binary.
package buildinfo

import (
	"runtime/debug"
	"strings"
)

// Info is what --version prints.
type Info struct {
	Module   string // module path
	Version  string // module version, "(devel)" for a build from a work tree
	Revision string // VCS revision, empty when the build had no VCS information
	Time     string // commit time (RFC 3339), empty when unknown
	Modified bool   // the work tree had uncommitted changes
	Go       string // toolchain version
}

// Read returns the running binary's build information.
func Read() Info { return fromBuildInfo(debug.ReadBuildInfo()) }

func fromBuildInfo(bi *debug.BuildInfo, ok bool) Info {
	if !ok || bi == nil {
		return Info{Version: "unknown"}
	}
	in := Info{Module: bi.Main.Path, Version: bi.Main.Version, Go: bi.GoVersion}
	if in.Version == "" {
		in.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.time":
			in.Time = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
}

// String is the one-line form: "VERSION (revision REV[, modified], TIME, goX)".
func (in Info) String() string {
	var extra []string
	if in.Revision != "" {
		r := "revision " + in.Revision
		if in.Modified {
			r += "+modified"
		}
		extra = append(extra, r)
	} else {
		extra = append(extra, "no VCS revision")
	}
	if in.Time != "" {
		extra = append(extra, in.Time)
	}
	if in.Go != "" {
		extra = append(extra, in.Go)
	}
	return in.Version + " (" + strings.Join(extra, ", ") + ")"
}
