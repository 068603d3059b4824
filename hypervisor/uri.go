package hypervisor

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// ParseURI turns a libvirt connection URI, as virsh -c takes it, into the
// URI to open on libvirtd and the unix socket that reaches it:
//
//	qemu:///system                      /run/libvirt/libvirt-sock
//	qemu:///session                     $XDG_RUNTIME_DIR/libvirt/libvirt-sock
//	qemu+unix:///system?socket=PATH     PATH
//
// hvpatch reads guest memory on the host, so remote transports (ssh, tcp,
// tls, libssh) are refused with a message rather than dialled locally.
func ParseURI(uri string) (driverURI, socket string, err error) {
	if uri == "" {
		uri = DefaultURI
	}
	u, err := url.Parse(uri)
	if err != nil {
		return "", "", fmt.Errorf("libvirt URI %q: %w", uri, err)
	}
	driver, transport, _ := strings.Cut(u.Scheme, "+")
	if driver == "" {
		return "", "", fmt.Errorf("libvirt URI %q: no driver (want e.g. qemu:///system)", uri)
	}
	switch transport {
	case "", "unix":
	default:
		return "", "", fmt.Errorf("libvirt URI %q: transport %q is not supported: hvpatch runs on the guest's host (use qemu:///system or qemu+unix:///system?socket=PATH)", uri, transport)
	}
	if u.Host != "" {
		return "", "", fmt.Errorf("libvirt URI %q: remote host %q is not supported: hvpatch runs on the guest's host", uri, u.Host)
	}
	q := u.Query()
	socket = q.Get("socket")
	if socket == "" {
		switch u.Path {
		case "/session":
			dir := os.Getenv("XDG_RUNTIME_DIR")
			if dir == "" {
				home, _ := os.UserHomeDir()
				dir = filepath.Join(home, ".cache")
			}
			socket = filepath.Join(dir, "libvirt", "libvirt-sock")
		default:
			socket = DefaultSocket
		}
	}
	// libvirtd is opened with the driver URI alone: the transport and the
	// client-side parameters (socket, mode, …) are ours to interpret.
	for _, k := range []string{"socket", "mode", "proxy", "no_verify", "no_tty", "pkipath", "name"} {
		q.Del(k)
	}
	driverURI = driver + "://" + u.Path
	if len(q) > 0 {
		driverURI += "?" + q.Encode()
	}
	return driverURI, socket, nil
}

// URIFromEnv is the URI virsh would use without -c: VIRSH_DEFAULT_CONNECT_URI,
// then LIBVIRT_DEFAULT_URI, then qemu:///system.
func URIFromEnv() string {
	for _, v := range []string{"VIRSH_DEFAULT_CONNECT_URI", "LIBVIRT_DEFAULT_URI"} {
		if s := os.Getenv(v); s != "" {
			return s
		}
	}
	return DefaultURI
}
