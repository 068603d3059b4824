package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
)

// ListenUnix opens the API socket with the configured owner, group and
// mode. The socket's permissions are the API's access control, so they are
// set before anyone can connect: the socket is created in a private
// temporary directory, fixed up there, then renamed into place.
func ListenUnix(path string, mode os.FileMode, owner, group string) (net.Listener, error) {
	uid, gid, err := lookupOwner(owner, group)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	tmpDir, err := os.MkdirTemp(dir, ".hvpatchd-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "sock")
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		l.Close()
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	if err := os.Chown(tmp, uid, gid); err != nil {
		return fail(err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return fail(err)
	}
	return &renamedListener{UnixListener: ul, path: path, inode: st.Sys().(*syscall.Stat_t).Ino}, nil
}

// renamedListener removes the socket at its final path on Close, once, and
// only while that path is still its own socket (a successor daemon may have
// put a new one there).
type renamedListener struct {
	*net.UnixListener
	path  string
	inode uint64
	once  sync.Once
}

func (r *renamedListener) Close() error {
	err := r.UnixListener.Close()
	r.once.Do(func() {
		if st, serr := os.Stat(r.path); serr == nil && st.Sys().(*syscall.Stat_t).Ino == r.inode {
			os.Remove(r.path)
		}
	})
	return err
}

// removeStaleSocket deletes a socket left by a daemon that died, but refuses
// to take over one that still answers, or a path that is not a socket.
func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("%s: another hvpatchd is already serving there", path)
	}
	return os.Remove(path)
}

func lookupOwner(owner, group string) (uid, gid int, err error) {
	uid, err = lookupID(owner, func(n string) (string, error) {
		u, err := user.Lookup(n)
		if err != nil {
			return "", err
		}
		return u.Uid, nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("api.owner %q: %w", owner, err)
	}
	gid, err = lookupID(group, func(n string) (string, error) {
		g, err := user.LookupGroup(n)
		if err != nil {
			return "", err
		}
		return g.Gid, nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("api.group %q: %w", group, err)
	}
	return uid, gid, nil
}

func lookupID(name string, byName func(string) (string, error)) (int, error) {
	if id, err := strconv.Atoi(name); err == nil {
		return id, nil
	}
	s, err := byName(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(s)
}

// TLSConfig is the TCP API's TLS set-up: TLS 1.3 only, and every client
// must present a certificate signed by the configured CA.
func TLSConfig(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("api.tcp certificate: %w", err)
	}
	caPEM, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, fmt.Errorf("api.tcp.client_ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("api.tcp.client_ca_file %s: no certificates in it", clientCAFile)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, nil
}
