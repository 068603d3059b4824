package testguest

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// KallsymsEntry is one line of the guest's /proc/kallsyms.
type KallsymsEntry struct {
	Addr   uint64
	Type   byte
	Name   string
	Module string // "" for the kernel image
}

// Kallsyms reads /proc/kallsyms inside the guest (as root, kptr_restrict=0).
// It travels gzip-compressed and base64-encoded: the serial line is the
// bottleneck, and plain text of a 6.12 kernel took minutes on a loaded host.
func (g *Guest) Kallsyms() ([]KallsymsEntry, error) {
	text, err := g.ReadFile("/proc/kallsyms")
	if err != nil {
		return nil, err
	}
	return ParseKallsyms(string(text))
}

// ReadFile returns a guest file's contents, compressed in transit.
func (g *Guest) ReadFile(path string) ([]byte, error) {
	out, err := g.RunTimeout(fmt.Sprintf("gzip -1 -c %s | base64", path), 5*time.Minute)
	if err != nil {
		return nil, err
	}
	raw, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(out), ""))
	if err != nil {
		return nil, fmt.Errorf("guest file %s: bad base64 from the guest: %w", path, err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("guest file %s: %w", path, err)
	}
	return io.ReadAll(zr)
}

// ParseKallsyms parses the /proc/kallsyms text format.
func ParseKallsyms(text string) ([]KallsymsEntry, error) {
	var syms []KallsymsEntry
	for n, line := range strings.Split(text, "\n") {
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 || len(f[1]) != 1 {
			return nil, fmt.Errorf("kallsyms line %d: %q", n+1, line)
		}
		addr, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			return nil, fmt.Errorf("kallsyms line %d: %v", n+1, err)
		}
		e := KallsymsEntry{Addr: addr, Type: f[1][0], Name: f[2]}
		if len(f) > 3 {
			e.Module = strings.Trim(f[3], "[]")
		}
		syms = append(syms, e)
	}
	return syms, nil
}

// ProcVersion is the guest's /proc/version.
func (g *Guest) ProcVersion() (string, error) { return g.Run("cat /proc/version") }

// Process is one task as the guest's procfs shows it.
type Process struct {
	PID, PPID int
	Comm      string
	State     byte
}

// PS lists the guest's processes from /proc/PID/stat (what ps reads). The
// shell and cat processes doing the listing appear in it too.
func (g *Guest) PS() ([]Process, error) {
	out, err := g.Run(`for d in /proc/[0-9]*; do cat $d/stat 2>/dev/null; echo; done`)
	if err != nil {
		return nil, err
	}
	var ps []Process
	for _, line := range strings.Split(out, "\n") {
		open, close := strings.IndexByte(line, '('), strings.LastIndexByte(line, ')')
		if open < 0 || close < open {
			continue
		}
		rest := strings.Fields(line[close+1:])
		if len(rest) < 2 {
			continue
		}
		pid, err1 := strconv.Atoi(strings.TrimSpace(line[:open]))
		ppid, err2 := strconv.Atoi(rest[1])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad /proc/PID/stat line %q", line)
		}
		ps = append(ps, Process{PID: pid, PPID: ppid, Comm: line[open+1 : close], State: rest[0][0]})
	}
	return ps, nil
}

// Module is one line of the guest's /proc/modules.
type Module struct {
	Name string
	Size uint64
	Addr uint64
}

// Modules reads /proc/modules.
func (g *Guest) Modules() ([]Module, error) {
	out, err := g.Run("cat /proc/modules")
	if err != nil {
		return nil, err
	}
	var mods []Module
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			continue
		}
		size, _ := strconv.ParseUint(f[1], 10, 64)
		addr, _ := strconv.ParseUint(strings.TrimPrefix(f[5], "0x"), 16, 64)
		mods = append(mods, Module{Name: f[0], Size: size, Addr: addr})
	}
	return mods, nil
}

// LoadModule insmods one of the modules shipped in the initramfs for the
// running kernel (dummy, crc-itu-t, nls_utf8).
func (g *Guest) LoadModule(name string) error {
	_, err := g.Run(fmt.Sprintf("insmod /lib/modules/$(uname -r)/%s.ko", name))
	return err
}
