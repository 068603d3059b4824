package codearea

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
)

// The allocation header is one page of the area, never mapped into the
// guest's address space. It is all a restarted daemon needs to find the
// area again and know what it holds:
//
//	[0:8)   magic "HVPAREA\x01"
//	[8:12)  length of the JSON that follows (little-endian)
//	[12:16) CRC-32 (IEEE) of that JSON
//	[16:)   JSON (header), the rest of the page zero
var headerMagic = []byte("HVPAREA\x01")

const (
	headerVersion = 1
	headerFixed   = 16
)

// header is the persistent state of an area.
type header struct {
	Version    int      `json:"version"`
	KernelText uint64   `json:"kernel_text"` // _text of the kernel that made it: KASLR changes it every boot
	Base       uint64   `json:"base"`        // virtual address of the 2 MiB slot
	PMDEntry   uint64   `json:"pmd_entry"`   // guest-physical address of the slot's PMD entry
	PageTable  uint64   `json:"page_table"`  // guest-physical address of the page table
	Text       []uint64 `json:"text"`        // guest-physical pages mapped RX, in address order
	Data       []uint64 `json:"data"`        // guest-physical pages mapped RW+NX, in address order
	Checks     []string `json:"checks"`      // the evidence the pages were free when the area was made
	Entries    []Entry  `json:"entries"`
}

// Entry is one placed object.
type Entry struct {
	Name      string `json:"name"`       // the entry symbol (the replacement function)
	TextPage  int    `json:"text_page"`  // first text page index
	TextPages int    `json:"text_pages"` // number of text pages
	DataPage  int    `json:"data_page"`
	DataPages int    `json:"data_pages"`
	TextSize  uint64 `json:"text_size"`
	DataSize  uint64 `json:"data_size"`
	Entry     uint64 `json:"entry"`          // virtual address of the entry symbol
	Site      uint64 `json:"site,omitempty"` // where the guest jumps to Entry from (0: not recorded)
	TextCRC   uint32 `json:"text_crc"`       // CRC-32 of the text as written
}

func (h *header) encode() ([]byte, error) {
	js, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if headerFixed+len(js) > pageSize {
		return nil, fmt.Errorf("codearea: allocation header of %d bytes does not fit its page (%d entries): release something first",
			headerFixed+len(js), len(h.Entries))
	}
	page := make([]byte, pageSize)
	copy(page, headerMagic)
	binary.LittleEndian.PutUint32(page[8:], uint32(len(js)))
	binary.LittleEndian.PutUint32(page[12:], crc32.ChecksumIEEE(js))
	copy(page[headerFixed:], js)
	return page, nil
}

// isHeader says whether a page starts with the magic.
func isHeader(page []byte) bool { return bytes.HasPrefix(page, headerMagic) }

func decodeHeader(page []byte) (*header, error) {
	if len(page) < headerFixed || !isHeader(page) {
		return nil, fmt.Errorf("no code-area magic")
	}
	n := int(binary.LittleEndian.Uint32(page[8:]))
	if n > len(page)-headerFixed {
		return nil, fmt.Errorf("header length %d exceeds the page", n)
	}
	js := page[headerFixed : headerFixed+n]
	if got, want := crc32.ChecksumIEEE(js), binary.LittleEndian.Uint32(page[12:]); got != want {
		return nil, fmt.Errorf("header checksum %#x, expected %#x: corrupted", got, want)
	}
	if !allZero(page[headerFixed+n:]) {
		return nil, fmt.Errorf("bytes after the header JSON are not zero")
	}
	var h header
	if err := json.Unmarshal(js, &h); err != nil {
		return nil, fmt.Errorf("header JSON: %w", err)
	}
	if h.Version != headerVersion {
		return nil, fmt.Errorf("header version %d, this hvpatch understands %d", h.Version, headerVersion)
	}
	if err := h.check(); err != nil {
		return nil, err
	}
	return &h, nil
}

// maxAreaPages is the most pages an area can have: the first MiB.
const maxAreaPages = lowMemEnd / pageSize

// check validates the numbers of a header read from the guest (which may
// have forged it) against each other: every page index, count and size is
// within the area's page lists, so nothing derived from them overflows or
// indexes out of range.
func (h *header) check() error {
	if len(h.Text) > maxAreaPages || len(h.Data) > maxAreaPages {
		return fmt.Errorf("%d text and %d data pages: more than the %d pages of the first MiB", len(h.Text), len(h.Data), maxAreaPages)
	}
	for _, e := range h.Entries {
		if err := e.check(len(h.Text), len(h.Data)); err != nil {
			return err
		}
	}
	return nil
}

// check validates an entry against an area of text and data pages.
func (e *Entry) check(text, data int) error {
	inside := func(first, n, total int) bool {
		return first >= 0 && n >= 0 && first < total && n <= total-first
	}
	switch {
	case e.TextPages < 1 || !inside(e.TextPage, e.TextPages, text):
		return fmt.Errorf("entry %q: text pages %d+%d outside the area's %d", e.Name, e.TextPage, e.TextPages, text)
	case !inside(e.DataPage, e.DataPages, data):
		return fmt.Errorf("entry %q: data pages %d+%d outside the area's %d", e.Name, e.DataPage, e.DataPages, data)
	case e.TextSize == 0 || e.TextSize > uint64(e.TextPages)*pageSize:
		return fmt.Errorf("entry %q: text of %d bytes in %d pages", e.Name, e.TextSize, e.TextPages)
	case e.DataSize > uint64(e.DataPages)*pageSize:
		return fmt.Errorf("entry %q: data of %d bytes in %d pages", e.Name, e.DataSize, e.DataPages)
	}
	return nil
}
