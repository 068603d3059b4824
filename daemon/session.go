package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hvpatch/hvpatch/patcher"
)

// A ptrace freeze ends by itself when its process dies. A stop through
// libvirt (direct+suspend) does not, and nothing else would resume it; the
// gdbstub writer has a guard process that detaches and resumes for a dead
// daemon, and this is its second line of defence. While such a stop is
// open, a marker file <state>/<uuid>.stopped exists, and a starting daemon
// resumes every domain whose marker it finds still paused.

const stoppedSuffix = ".stopped"

// markWriter wraps w with the marker when its stops outlive the process.
// The wrapper embeds the writer and its stopped guest, so every capability
// (reading registers during the stop) stays visible.
func markWriter(w patcher.CodeWriter, stateDir, uuid string) patcher.CodeWriter {
	if !w.Capabilities().OutlivesProcess {
		return w
	}
	return markedWriter{CodeWriter: w, path: filepath.Join(stateDir, uuid+stoppedSuffix)}
}

type markedWriter struct {
	patcher.CodeWriter
	path string
}

func (w markedWriter) Stop(ctx context.Context) (patcher.StoppedGuest, error) {
	if err := writeSynced(w.path, strconv.Itoa(os.Getpid())); err != nil {
		return nil, err
	}
	sg, err := w.CodeWriter.Stop(ctx)
	if err != nil {
		// A failed stop resumes what it stopped (the writers do); the
		// marker may stay: a later start only resumes a paused domain.
		return nil, err
	}
	return markedStopped{StoppedGuest: sg, path: w.path}, nil
}

// Settle passes on the wrapped writer's Settle (see patcher's
// settleWriters), when it has one.
func (w markedWriter) Settle() error {
	if s, ok := w.CodeWriter.(interface{ Settle() error }); ok {
		return s.Settle()
	}
	return nil
}

type markedStopped struct {
	patcher.StoppedGuest
	path string
}

func (s markedStopped) Resume() (patcher.FreezeReport, error) {
	r, err := s.StoppedGuest.Resume()
	if err == nil {
		os.Remove(s.path)
	}
	return r, err
}

func writeSynced(path, content string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// markerGrace is how long a dead daemon's marker is kept after its domain
// was found running: its gdbstub guard may still connect (which stops the
// VM) and detach, and a detach was seen to leave the VM paused.
const markerGrace = 15 * time.Second

// recoverStops resumes the domains a previous daemon left stopped. It runs
// at start and at every refresh, and ignores this process's own markers.
func (d *Daemon) recoverStops(ctx context.Context) {
	marks, _ := filepath.Glob(filepath.Join(d.cfg.StateDir, "*"+stoppedSuffix))
	for _, m := range marks {
		b, err := os.ReadFile(m)
		if err != nil || strings.TrimSpace(string(b)) == strconv.Itoa(os.Getpid()) {
			continue
		}
		uuid := strings.TrimSuffix(filepath.Base(m), stoppedSuffix)
		hv, err := d.conn.LookupDomain(ctx, uuid)
		if err != nil {
			os.Remove(m) // the domain is gone
			continue
		}
		st, err := hv.RunStatus(ctx)
		if err != nil {
			d.log.Warn("checking a domain a previous hvpatchd stopped", "domain", hv.Name(), "err", err)
			continue
		}
		if st != "running" {
			if err := hv.QMP(ctx, "cont", nil, nil); err != nil {
				d.log.Error("resuming a domain a previous hvpatchd left stopped", "domain", hv.Name(), "status", st, "err", err)
				continue
			}
			d.log.Warn("resumed a domain a previous hvpatchd left stopped mid-operation", "domain", hv.Name(), "status", st)
			continue
		}
		if fi, err := os.Stat(m); err == nil && time.Since(fi.ModTime()) > markerGrace {
			os.Remove(m)
		}
	}
}
