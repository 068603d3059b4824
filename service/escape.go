package service

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Escape makes a string from the guest (a task's comm, the banner, a
// module or symbol name) safe to print as text: control characters
// (newlines, tabs, ESC and the rest of C0, DEL, C1), Unicode format and
// separator characters (bidirectional overrides, line separators) and
// invalid UTF-8 become visible escapes (\n, \t, \x1b, \u202e), and a
// backslash is doubled, so the escaped form is unambiguous. A guest cannot
// forge output lines or columns, or drive the terminal. JSON output needs
// none of this: encoding/json escapes what it must.
func Escape(s string) string { return escape(s, true) }

// EscapeControls is Escape for text that is ours but may quote the
// guest's (an error message): backslashes stay as they are, so what %q
// already quoted reads the same.
func EscapeControls(s string) string { return escape(s, false) }

func escape(s string, backslash bool) string {
	if !needsEscape(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\' && backslash:
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r < 0x80:
			b.WriteRune(r)
		case r <= 0x9f || unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp, unicode.Co, unicode.Cs):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

func needsEscape(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f || c == '\\' || c >= 0x80 {
			return true
		}
	}
	return false
}
