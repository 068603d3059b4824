package hypervisor

import (
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	for _, c := range []struct{ uri, driver, socket, err string }{
		{"", "qemu:///system", DefaultSocket, ""},
		{"qemu:///system", "qemu:///system", DefaultSocket, ""},
		{"qemu:///session", "qemu:///session", "/run/user/1000/libvirt/libvirt-sock", ""},
		{"qemu+unix:///system?socket=/tmp/x/libvirt-sock", "qemu:///system", "/tmp/x/libvirt-sock", ""},
		{"qemu+unix:///system", "qemu:///system", DefaultSocket, ""},
		{"test:///default", "test:///default", DefaultSocket, ""},
		{"qemu+ssh://root@host/system", "", "", "transport \"ssh\""},
		{"qemu://host/system", "", "", "remote host"},
		{":bad", "", "", "bad"},
	} {
		d, s, err := ParseURI(c.uri)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("ParseURI(%q): %v, want an error with %q", c.uri, err, c.err)
			}
			continue
		}
		if err != nil || d != c.driver || s != c.socket {
			t.Errorf("ParseURI(%q) = %q, %q, %v; want %q, %q", c.uri, d, s, err, c.driver, c.socket)
		}
	}
}

func TestURIFromEnv(t *testing.T) {
	t.Setenv("VIRSH_DEFAULT_CONNECT_URI", "")
	t.Setenv("LIBVIRT_DEFAULT_URI", "")
	if got := URIFromEnv(); got != DefaultURI {
		t.Errorf("no environment: %q", got)
	}
	t.Setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")
	if got := URIFromEnv(); got != "qemu:///session" {
		t.Errorf("LIBVIRT_DEFAULT_URI: %q", got)
	}
	t.Setenv("VIRSH_DEFAULT_CONNECT_URI", "qemu+unix:///system?socket=/x")
	if got := URIFromEnv(); got != "qemu+unix:///system?socket=/x" {
		t.Errorf("VIRSH_DEFAULT_CONNECT_URI first: %q", got)
	}
}
