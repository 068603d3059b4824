package service

import (
	"errors"
	"strings"

	"github.com/digitalocean/go-libvirt"
)

// Kinds of error, as --json errors name them.
const (
	KindUsage      = "usage"      // wrong arguments or flags (exit status 2)
	KindNotFound   = "not_found"  // no such domain, symbol or patch
	KindConnection = "connection" // libvirtd or hvpatchd cannot be reached
	KindError      = "error"      // everything else
)

// ErrorKind classifies err for --json. An error that came back from
// hvpatchd is only text, so the text is classified when no type says: the
// same error gets the same kind through the daemon and standalone.
func ErrorKind(err error) string {
	var lv libvirt.Error
	var lvp *libvirt.Error
	if errors.As(err, &lv) && lv.Code == uint32(libvirt.ErrNoDomain) || errors.As(err, &lvp) && lvp.Code == uint32(libvirt.ErrNoDomain) {
		return KindNotFound
	}
	msg := err.Error()
	for _, s := range []string{"Domain not found", "no domain with matching", "no symbol ", "no such patch", "not applied"} {
		if strings.Contains(msg, s) {
			return KindNotFound
		}
	}
	for _, s := range []string{"connecting to libvirtd", "hvpatchd at ", "hvpatchd socket ", "libvirt URI "} {
		if strings.Contains(msg, s) {
			return KindConnection
		}
	}
	return KindError
}

// ErrorJSON is what --json prints on stderr for a failed command.
type ErrorJSON struct {
	Error  string `json:"error"`
	Domain string `json:"domain,omitempty"`
	Kind   string `json:"kind"`
}
