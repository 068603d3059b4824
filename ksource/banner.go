// Package ksource provides the exact Debian kernel source tree a guest's
// kernel was built from, configured and prepared the way Debian's build did,
// and compiles single objects of it with kbuild's own flags. hvpatch build
// compiles a changed file before and after a source diff; the "before" object
// must match the guest's code byte for byte, or the diff of the two objects
// says nothing reliable about what the patch changes.
package ksource

import (
	"fmt"
	"regexp"
	"strings"
)

// Build is the exact kernel build a guest runs, as its banner (linux_banner,
// /proc/version) names it.
type Build struct {
	Release  string // uname -r: "6.1.0-54-cloud-amd64", "6.12.117+deb12-cloud-amd64"
	Series   string // "6.1", "6.12": suffix of linux-source-<series> and linux-kbuild-<series>
	ABI      string // "6.1.0-54", "6.12.117+deb12": linux-headers-<ABI>-common
	Flavour  string // "cloud-amd64"
	Version  string // Debian source version: "6.1.190-1"
	Compiler string // as in the banner: "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
}

// Debian's release strings: the 6.1 ABI form "6.1.0-57-<flavour>" and the
// backport form "6.12.117+deb12-<flavour>".
var debianRelease = regexp.MustCompile(`^((\d+)\.(\d+)\.\d+(?:-\d+|\+deb\d+))-([a-z0-9]+(?:-[a-z0-9]+)*)$`)

// The version stamp Debian's build puts after the build number:
// "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-11-26)".
var debianVersion = regexp.MustCompile(`#\d*\s.*\bDebian (\S+) \([^)]*\)\s*$`)

// ParseBanner reads a Debian kernel banner. Banners of other kernels (own
// builds, other distributions) are an error: their sources cannot be fetched
// from the Debian archive, and the caller has to point at a prepared tree.
func ParseBanner(banner string) (Build, error) {
	banner = strings.TrimSpace(banner)
	rest, ok := strings.CutPrefix(banner, "Linux version ")
	if !ok {
		return Build{}, fmt.Errorf("ksource: %q is no kernel banner (want \"Linux version ...\")", short(banner))
	}
	release, rest, _ := strings.Cut(rest, " ")
	notDebian := func(why string) (Build, error) {
		return Build{}, fmt.Errorf("ksource: banner %q is not a Debian kernel build (%s); use --source DIR with a prepared tree of its sources", short(banner), why)
	}
	m := debianRelease.FindStringSubmatch(release)
	if m == nil {
		return notDebian("release " + release + " has no Debian ABI form")
	}
	b := Build{Release: release, ABI: m[1], Series: m[2] + "." + m[3], Flavour: m[4]}
	v := debianVersion.FindStringSubmatch(rest)
	if v == nil {
		return notDebian("no \"Debian <version>\" stamp")
	}
	b.Version = v[1]
	// The banner holds "(builder) (compiler, linker) #..."; the compiler
	// text itself contains parentheses, so walk them.
	groups := parenGroups(rest)
	if len(groups) < 2 {
		return notDebian("no compiler in banner")
	}
	cc, _, _ := strings.Cut(groups[1], ", ")
	b.Compiler = strings.TrimSpace(cc)
	if b.Compiler == "" {
		return notDebian("empty compiler")
	}
	return b, nil
}

// parenGroups returns the contents of the top-level parenthesised groups of
// s before the first '#', in order.
func parenGroups(s string) []string {
	var out []string
	depth, start := 0, 0
	for i, c := range s {
		switch {
		case c == '#' && depth == 0:
			return out
		case c == '(':
			if depth == 0 {
				start = i + 1
			}
			depth++
		case c == ')' && depth > 0:
			depth--
			if depth == 0 {
				out = append(out, s[start:i])
			}
		}
	}
	return out
}

func short(s string) string {
	if len(s) > 120 {
		return s[:120] + "..."
	}
	return s
}
