package symbols

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// The kernel's build step (scripts/kallsyms) emits these tables into
// .rodata. The layouts, and the upstream changes that introduced them:
//
//	up to 6.3:  addresses|offsets, [relative_base], num_syms, names, markers,
//	            [seqs_of_names], token_table, token_index
//	            (labels aligned to the pointer size)
//	6.4 to 6.x: num_syms, names, markers, token_table, token_index,
//	            addresses|offsets, [relative_base], seqs_of_names
//	            (404bad70fcf7 "scripts/kallsyms: change the output order")
//	7.0 and on: num_syms, names, markers, token_table, token_index,
//	            offsets, seqs_of_names; every label 4-aligned, no
//	            relative_base (a081b5789255 "kallsyms: Get rid of kallsyms
//	            relative base")
//
// names is a stream of entries: a length (one byte, or two as ULEB128 since
// 6.1, "kallsyms: support "big" kernel symbols") then that many token codes.
// Expanding the codes through token_table gives the type letter followed by
// the name. markers[i] is the stream offset of entry 256*i.
// kallsyms_seqs_of_names (3 bytes per symbol) came with 6.2 ("kallsyms:
// Improve the performance of kallsyms_lookup_name()"; stable backports put
// it into older series too).
//
// The addresses, by kernel:
//   - absolute pointers (kallsyms_addresses), without
//     KALLSYMS_BASE_RELATIVE; gone in 6.11 ("kallsyms: get rid of code for
//     absolute kallsyms");
//   - 32-bit offsets from kallsyms_relative_base; with KALLSYMS_ABSOLUTE_PERCPU
//     (x86-64 SMP) a non-negative offset is itself the (unrelocated) per-CPU
//     value and a negative one means relative_base - 1 - offset, until 6.15
//     (01157ddc58dc "kallsyms: Remove KALLSYMS_ABSOLUTE_PERCPU"), then plain
//     unsigned offsets;
//   - from 7.0 (a081b5789255) place-relative: entry i holds the symbol's
//     address minus the entry's own address (".long _text - . + off",
//     read back with offset_to_ptr).
//
// Nothing here trusts a symbol: the token table is found by its shape, every
// other table by where the layouts put it, and each candidate is checked in
// full (names printable, markers matching the stream, addresses sorted)
// before it is accepted.

// Layout kinds of KallsymsInfo.Layout.
const (
	LayoutAddressesFirst = "addresses-first" // up to Linux 6.3
	LayoutNumSymsFirst   = "num_syms-first"  // Linux 6.4 and later
)

// Address kinds of KallsymsInfo.Addressing.
const (
	AddrAbsolute               = "absolute"                      // kallsyms_addresses, pointers
	AddrRelative               = "base-relative"                 // kallsyms_offsets + relative_base
	AddrRelativeAbsolutePerCPU = "base-relative+absolute-percpu" // non-negative offsets are absolute values
	AddrPlaceRelative          = "place-relative"                // 7.0+: offset from the entry's own address
)

// KallsymsInfo describes where the tables were found. Addresses are virtual
// addresses in the image's address space; 0 means absent.
type KallsymsInfo struct {
	Layout       string
	Addressing   string
	PointerSize  int // alignment of the labels (4 on 7.0+ kernels) and size of absolute addresses
	NumSyms      int
	NumAbsolute  int    // symbols whose value is not relocated (per-CPU)
	RelativeBase uint64 // value of kallsyms_relative_base, 0 for absolute addressing

	NumSymsAddr      uint64
	NamesAddr        uint64
	NamesSize        int
	MarkersAddr      uint64
	TokenTableAddr   uint64
	TokenIndexAddr   uint64
	AddressesAddr    uint64 // kallsyms_addresses or kallsyms_offsets
	RelativeBaseAddr uint64
	SeqsOfNamesAddr  uint64
	SeqsEntrySize    int // bytes per kallsyms_seqs_of_names entry (3 or 4), 0 if absent
}

// String is a multi-line summary for humans.
func (in *KallsymsInfo) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "layout %s, %s addressing, %d symbols (%d absolute)\n", in.Layout, in.Addressing, in.NumSyms, in.NumAbsolute)
	row := func(name string, addr uint64, extra string) {
		if addr != 0 {
			fmt.Fprintf(&b, "  %-24s %#x%s\n", name, addr, extra)
		}
	}
	row("kallsyms_num_syms", in.NumSymsAddr, "")
	row("kallsyms_names", in.NamesAddr, fmt.Sprintf(" (%d bytes)", in.NamesSize))
	row("kallsyms_markers", in.MarkersAddr, "")
	row("kallsyms_token_table", in.TokenTableAddr, "")
	row("kallsyms_token_index", in.TokenIndexAddr, "")
	switch in.Addressing {
	case AddrAbsolute:
		row("kallsyms_addresses", in.AddressesAddr, "")
	case AddrPlaceRelative:
		row("kallsyms_offsets", in.AddressesAddr, " (place-relative)")
	default:
		row("kallsyms_offsets", in.AddressesAddr, "")
		row("kallsyms_relative_base", in.RelativeBaseAddr, fmt.Sprintf(" = %#x", in.RelativeBase))
	}
	row("kallsyms_seqs_of_names", in.SeqsOfNamesAddr, fmt.Sprintf(" (%d bytes each)", in.SeqsEntrySize))
	return b.String()
}

// DecodeKallsyms finds and decodes the kernel's compressed kallsyms tables
// inside img, a copy of kernel memory whose first byte is at virtual address
// base (typically [_text, _end), with unreadable pages zero-filled). It
// returns symbols with the addresses the running kernel uses.
func DecodeKallsyms(img []byte, base uint64) (*Table, error) {
	t, _, err := DecodeKallsymsInfo(img, base)
	return t, err
}

// DecodeKallsymsContext is DecodeKallsyms that gives up when ctx is done.
func DecodeKallsymsContext(ctx context.Context, img []byte, base uint64) (*Table, error) {
	t, _, err := decodeKallsyms(ctx, img, base, MaxDecodeWork)
	return t, err
}

// DecodeKallsymsInfo is DecodeKallsyms that also says where the tables are.
func DecodeKallsymsInfo(img []byte, base uint64) (*Table, *KallsymsInfo, error) {
	return decodeKallsyms(context.Background(), img, base, MaxDecodeWork)
}

// The search is bounded, for memory a guest controls: a guest can plant
// any number of things shaped like a token table, each of which starts a
// search back through up to 32 MiB for the other tables. Real kernels put
// their token table first among the candidates (it holds the digit tokens
// the search starts from) and decode in under a million steps (Debian 6.1:
// 0.57 million, 6.12: 0.84 million; a full scan of a 64 MiB image for the
// token table, when the digits are not found, adds 16 million). The budget
// is a hundred times that, a fraction of a second; one back-scan of 32 MiB
// is 8 million steps, so a dozen planted tables exhaust it.
const (
	// MaxDecodeWork bounds the steps (words looked at, entries walked)
	// spent on all candidates together.
	MaxDecodeWork = 100_000_000
	// MaxTokenCandidates bounds the token tables tried.
	MaxTokenCandidates = 64
)

func decodeKallsyms(ctx context.Context, img []byte, base uint64, limit int64) (*Table, *KallsymsInfo, error) {
	d := decoder{img: img, base: base, ctx: ctx, limit: limit}
	var firstErr error
	tried := 0
	for tok := range d.findTokenTables() {
		if tried++; tried > MaxTokenCandidates {
			return nil, nil, fmt.Errorf("kallsyms: gave up after %d token-table candidates in %d bytes at %#x (the limit on candidates; first failure: %v)",
				MaxTokenCandidates, len(img), base, firstErr)
		}
		t, info, err := d.decodeAround(tok)
		if d.err != nil {
			return nil, nil, d.err
		}
		if err == nil {
			return t, info, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if d.err != nil {
		return nil, nil, d.err
	}
	if firstErr == nil {
		return nil, nil, fmt.Errorf("kallsyms: no token table/token index pair in %d bytes at %#x (not kernel memory, or kallsyms not built in)", len(img), base)
	}
	return nil, nil, firstErr
}

type decoder struct {
	img  []byte
	base uint64

	ctx       context.Context // nil: no cancellation
	limit     int64           // steps allowed, 0: no limit
	work      int64           // steps taken
	lastCheck int64
	err       error // set when the budget is spent or ctx done: stop everything
}

// spend accounts for n steps of the search; false means stop (d.err says
// why).
func (d *decoder) spend(n int) bool {
	if d.err != nil {
		return false
	}
	d.work += int64(n)
	if d.limit > 0 && d.work > d.limit {
		d.err = fmt.Errorf("kallsyms: gave up after %d search steps (the limit on decoding work) over %d bytes at %#x: too many false candidates for the tables", d.limit, len(d.img), d.base)
		return false
	}
	if d.ctx != nil && d.work-d.lastCheck >= 1<<20 {
		d.lastCheck = d.work
		if err := d.ctx.Err(); err != nil {
			d.err = fmt.Errorf("kallsyms: decoding stopped after %d steps: %w", d.work, err)
			return false
		}
	}
	return true
}

func (d *decoder) u16(off int) uint16 { return binary.LittleEndian.Uint16(d.img[off:]) }
func (d *decoder) u32(off int) uint32 { return binary.LittleEndian.Uint32(d.img[off:]) }
func (d *decoder) u64(off int) uint64 { return binary.LittleEndian.Uint64(d.img[off:]) }

// aligned reports whether image offset off sits at a virtual address that
// is a multiple of a.
func (d *decoder) aligned(off, a int) bool { return (d.base+uint64(off))%uint64(a) == 0 }

// alignUp rounds image offset off up to a virtual multiple of a.
func (d *decoder) alignUp(off, a int) int {
	for !d.aligned(off, a) {
		off++
	}
	return off
}

// alignDown rounds image offset off down to a virtual multiple of a.
func (d *decoder) alignDown(off, a int) int {
	for !d.aligned(off, a) {
		off--
	}
	return off
}

func (d *decoder) va(off int) uint64 { return d.base + uint64(off) }

// tokenTable is a located token_table + token_index pair.
type tokenTable struct {
	table, index int // image offsets
	tok          [256][]byte
}

// digitTokens is how the token table holds the digits: every character
// used in any symbol keeps a one-character token of its own code, so '0'..'9'
// are ten consecutive tokens. Searching for it first finds the table in a
// few milliseconds; the full scan is the fallback.
var digitTokens = []byte("0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00")

// maxTokenTable bounds the token table: 256 tokens of at most 255 bytes.
const maxTokenTable = 256 * 256

// findTokenTables returns token_index candidates with their tables: near
// the digit tokens first, then from a scan of the whole image.
func (d *decoder) findTokenTables() func(yield func(*tokenTable) bool) {
	return func(yield func(*tokenTable) bool) {
		seen := map[int]bool{}
		scanned := 0 // no token_index below this that was not yielded
		for from := 0; ; {
			i := bytes.Index(d.img[from:], digitTokens)
			if i < 0 {
				break
			}
			a := from + i
			from = a + 1
			to := min(len(d.img), a+maxTokenTable+1024)
			t := d.scanTokenIndex(max(a, scanned), to)
			if t == nil {
				scanned = max(scanned, to)
				continue
			}
			scanned = t.index + 4
			if !seen[t.index] {
				seen[t.index] = true
				if !yield(t) {
					return
				}
			}
		}
		for p := 0; p < len(d.img); {
			t := d.scanTokenIndex(p, len(d.img))
			if t == nil {
				return
			}
			p = t.index + 4
			if !seen[t.index] {
				seen[t.index] = true
				if !yield(t) {
					return
				}
			}
		}
	}
}

// scanTokenIndex returns the first token_index in [from, to) with a valid
// token table before it. token_index is 256 little-endian u16 offsets into
// the table, the first 0, each token at least one byte (but for a few unused
// codes), and labels are at least 4-aligned, so only those positions are
// looked at.
func (d *decoder) scanTokenIndex(from, to int) *tokenTable {
	img := d.img
	for p := d.alignUp(from, 4); p+512 <= to; p += 4 {
		if p&0xffff == 0 && !d.spend(1<<14) {
			return nil
		}
		// A u16 of 0, then the second offset 2..256: this rejects
		// zero-filled memory at once.
		w := binary.LittleEndian.Uint32(img[p:])
		if w&0xffff != 0 || (w>>16)-2 > 254 {
			continue
		}
		if t := d.tokenTableAt(p); t != nil {
			return t
		}
	}
	return nil
}

// tokenTableAt checks a token_index candidate at p and finds its table.
func (d *decoder) tokenTableAt(p int) *tokenTable {
	var idx [256]int
	nonEmpty := 0
	for i := 1; i < 256; i++ {
		idx[i] = int(d.u16(p + 2*i))
		step := idx[i] - idx[i-1]
		if step < 1 || step > 256 {
			return nil
		}
		if step > 1 {
			nonEmpty++
		}
	}
	if nonEmpty < 32 {
		return nil
	}
	// The table ends with the last token's NUL, then up to 7 bytes of
	// alignment padding before token_index.
	for pad := 0; pad < 8 && p-pad-1 >= 0; pad++ {
		end := p - pad // one past the last token's NUL
		if d.img[end-1] != 0 {
			continue
		}
		last := end - 1
		for last > 0 && d.img[last-1] != 0 && end-1-last < 256 {
			last--
		}
		tableStart := last - idx[255]
		if tableStart < 0 {
			continue
		}
		if t := d.checkTokens(tableStart, p, &idx, end); t != nil {
			return t
		}
	}
	return nil
}

func (d *decoder) checkTokens(table, index int, idx *[256]int, end int) *tokenTable {
	t := &tokenTable{table: table, index: index}
	for i := 0; i < 256; i++ {
		s := table + idx[i]
		e := end - 1
		if i < 255 {
			e = table + idx[i+1] - 1
		}
		if d.img[e] != 0 {
			return nil
		}
		for _, c := range d.img[s:e] {
			if c <= ' ' || c >= 0x7f {
				return nil
			}
		}
		t.tok[i] = d.img[s:e:e]
	}
	return t
}

// decodeAround finds the other tables of the token table tok.
func (d *decoder) decodeAround(tok *tokenTable) (*Table, *KallsymsInfo, error) {
	// markers precede token_table directly (6.4+, and before 6.2) or with
	// kallsyms_seqs_of_names in between (6.2/6.3 and stable backports). Look
	// back for the start of an array of u32 beginning with 0.
	const maxBack = 32 << 20
	lowest := max(0, tok.table-maxBack)
	var lastErr error
	for m := d.alignDown(tok.table-4, 4); m >= lowest; m -= 4 {
		if !d.spend(1) {
			return nil, nil, d.err
		}
		if d.u32(m) != 0 {
			continue
		}
		run := d.markerRun(m, tok.table)
		if !plausibleGap(tok.table-m, run) {
			continue
		}
		t, info, err := d.decodeWithMarkers(tok, m, run)
		if err == nil {
			return t, info, nil
		}
		if lastErr == nil || !errors.Is(err, errNoNames) {
			lastErr = err
		}
	}
	if lastErr == nil || errors.Is(lastErr, errNoNames) {
		return nil, nil, fmt.Errorf("kallsyms: token table at %#x (token_index %#x) but no kallsyms_markers/kallsyms_names before it match", d.va(tok.table), d.va(tok.index))
	}
	return nil, nil, lastErr
}

// markerRun counts the plausible markers from m: 0 first, then strictly
// increasing by 2..512 bytes per symbol on average.
func (d *decoder) markerRun(m, limit int) int {
	n := 1
	prev := uint32(0)
	for q := m + 4; q+4 <= limit; q += 4 {
		if !d.spend(1) {
			break
		}
		v := d.u32(q)
		if v <= prev || v-prev < 2*256 || v-prev > 512*256 {
			break
		}
		prev = v
		n++
	}
	return n
}

// plausibleGap says whether markers starting dist bytes before the token
// table, with run plausible entries, can end where the layouts put them:
// right before the table (up to padding), or before kallsyms_seqs_of_names
// of 3 or 4 bytes per symbol. The run may have taken one entry too many
// from the bytes that follow. This keeps zero-filled memory before a token
// table from being tried word by word.
func plausibleGap(dist, run int) bool {
	for k := max(1, run-1); k <= run; k++ {
		gap := dist - 4*k
		if gap >= 0 && (gap < 8 || gap >= 3*256*(k-1) && gap <= 4*256*k+16) {
			return true
		}
	}
	return false
}

var errNoNames = errors.New("no names stream")

// decodeWithMarkers looks for kallsyms_num_syms and kallsyms_names before
// the markers at m: the stream ends at m (up to alignment padding) and its
// entries land on every marker.
func (d *decoder) decodeWithMarkers(tok *tokenTable, m, run int) (*Table, *KallsymsInfo, error) {
	markers := func(i int) int { return int(d.u32(m + 4*i)) }
	window := markers(run-1) + 512*256 + 16
	lowest := max(8, m-window)
	var lastErr error = errNoNames
	// The stream holds at least everything up to the last marker (the run
	// may have one entry too many), so the search starts below it.
	highest := m - 2 - markers(max(0, run-2))
	for s := d.alignDown(highest, 4); s >= lowest; s -= 4 {
		if !d.spend(1) {
			return nil, nil, d.err
		}
		// num_syms is one label before names: 8 bytes back with 8-byte
		// labels (the u32 then padding), 4 bytes back with 4-byte labels.
		for _, gap := range [2]int{8, 4} {
			n := int(d.u32(s - gap))
			k := (n + 255) / 256
			if n == 0 || k > run || s+markers(k-1) >= m {
				continue
			}
			end, ok := d.walkNames(s, n, m)
			if !ok {
				continue
			}
			t, info, err := d.finish(tok, s-gap, s, end, m, n)
			if err == nil {
				return t, info, nil
			}
			lastErr = err
		}
	}
	return nil, nil, lastErr
}

// walkNames steps through n entries from s, checking each marker, and
// returns where the stream ends. The end must be within alignment padding
// (zero bytes) of the markers at m.
func (d *decoder) walkNames(s, n, m int) (int, bool) {
	pos := s
	for i := 0; i < n; i++ {
		if i&0xff == 0 && (pos-s != int(d.u32(m+4*(i>>8))) || !d.spend(256)) {
			return 0, false
		}
		if pos >= m {
			return 0, false
		}
		l := int(d.img[pos])
		pos++
		if l&0x80 != 0 {
			if pos >= m {
				return 0, false
			}
			l = l&0x7f | int(d.img[pos])<<7
			pos++
		}
		if l == 0 {
			return 0, false
		}
		pos += l
	}
	if pos > m || m-pos >= 8 {
		return 0, false
	}
	for _, c := range d.img[pos:m] {
		if c != 0 {
			return 0, false
		}
	}
	return pos, true
}

// finish decodes names, then finds the addresses where the layouts put
// them. ptr is the label alignment, which num_syms's distance to names
// gave away (8 on 64-bit kernels, 4 on 32-bit ones).
func (d *decoder) finish(tok *tokenTable, numSymsOff, names, namesEnd, markers, n int) (*Table, *KallsymsInfo, error) {
	k := (n + 255) / 256
	if !d.spend(4 * n) { // expanding, and the address tables
		return nil, nil, d.err
	}
	syms, err := d.expandNames(tok, names, n)
	if err != nil {
		return nil, nil, err
	}
	ptr := names - numSymsOff
	info := &KallsymsInfo{
		PointerSize:    ptr,
		NumSyms:        n,
		NumSymsAddr:    d.va(numSymsOff),
		NamesAddr:      d.va(names),
		NamesSize:      namesEnd - names,
		MarkersAddr:    d.va(markers),
		TokenTableAddr: d.va(tok.table),
		TokenIndexAddr: d.va(tok.index),
	}
	markersEnd := markers + 4*k
	gap := tok.table - markersEnd
	var errs []string
	if gap < ptr {
		// Either layout is possible; the newer one keeps the addresses
		// after token_index.
		if err = d.addressesAfterIndex(tok, syms, info); err == nil {
			info.Layout = LayoutNumSymsFirst
			return newTableOwned(syms), info, nil
		}
		errs = append(errs, err.Error())
	} else {
		// kallsyms_seqs_of_names sits between the markers and the tokens.
		seqs := d.alignUp(markersEnd, ptr)
		size := tok.table - seqs
		for _, es := range [2]int{3, 4} {
			if size >= es*n && size-es*n < ptr {
				info.SeqsOfNamesAddr = d.va(seqs)
				info.SeqsEntrySize = es
			}
		}
		if info.SeqsEntrySize == 0 {
			return nil, nil, fmt.Errorf("kallsyms: %d bytes between kallsyms_markers end %#x and token table %#x fit no kallsyms_seqs_of_names for %d symbols", size, d.va(markersEnd), d.va(tok.table), n)
		}
	}
	if err = d.addressesBeforeNumSyms(numSymsOff, syms, info); err == nil {
		info.Layout = LayoutAddressesFirst
		return newTableOwned(syms), info, nil
	}
	errs = append(errs, err.Error())
	return nil, nil, fmt.Errorf("kallsyms: names at %#x (%d symbols) decoded, but no address table matches: %s", d.va(names), n, strings.Join(errs, "; "))
}

// expandNames expands n entries from s into symbols without addresses. All
// names share one string, so decoding costs a handful of allocations. Tokens
// are copied as fixed 32-byte blocks (the buffer has slack for the overrun):
// that is several times faster than a copy call per token.
func (d *decoder) expandNames(tok *tokenTable, s, n int) ([]Symbol, error) {
	var toklen [256]int
	var fixed [256][32]byte
	for c, t := range tok.tok {
		toklen[c] = len(t)
		copy(fixed[c][:], t)
	}
	// First pass: the exact expanded size.
	total := 0
	pos := s
	for i := 0; i < n; i++ {
		l := int(d.img[pos])
		pos++
		if l&0x80 != 0 {
			l = l&0x7f | int(d.img[pos])<<7
			pos++
		}
		for _, c := range d.img[pos : pos+l] {
			total += toklen[c]
		}
		pos += l
	}
	buf := make([]byte, total+32)
	ends := make([]int32, n)
	w := 0
	pos = s
	for i := 0; i < n; i++ {
		l := int(d.img[pos])
		pos++
		if l&0x80 != 0 {
			l = l&0x7f | int(d.img[pos])<<7
			pos++
		}
		start := w
		for _, c := range d.img[pos : pos+l] {
			if tl := toklen[c]; tl <= 32 {
				*(*[32]byte)(buf[w:]) = fixed[c]
				w += tl
			} else {
				w += copy(buf[w:], tok.tok[c])
			}
		}
		pos += l
		if w-start < 2 {
			return nil, fmt.Errorf("kallsyms: symbol %d at %#x expands to %q, too short for a type and a name", i, d.va(pos-l), buf[start:w])
		}
		if !isTypeLetter(buf[start]) {
			return nil, fmt.Errorf("kallsyms: symbol %d at %#x has type %q, not a letter", i, d.va(pos-l), buf[start])
		}
		ends[i] = int32(w)
	}
	all := string(buf[:w])
	syms := make([]Symbol, n)
	start := 0
	for i := range syms {
		e := int(ends[i])
		syms[i] = Symbol{Type: all[start], Name: all[start+1 : e]}
		start = e
	}
	return syms, nil
}

func isTypeLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

// addressesAfterIndex reads the 6.4+ tables that follow token_index.
func (d *decoder) addressesAfterIndex(tok *tokenTable, syms []Symbol, info *KallsymsInfo) error {
	ptr := info.PointerSize
	at := d.alignUp(tok.index+512, ptr)
	var errPlace error
	if ptr == 4 {
		// 7.0+: 4-aligned labels, place-relative offsets, then
		// seqs_of_names; no relative_base.
		if errPlace = d.placeRelativeAddresses(at, syms, info); errPlace == nil {
			seqs := d.alignUp(at+4*len(syms), 4)
			if seqs+3*len(syms) <= len(d.img) {
				info.SeqsOfNamesAddr = d.va(seqs)
				info.SeqsEntrySize = 3
			}
			return nil
		}
	}
	errRel := d.relativeAddresses(at, syms, info)
	if errRel == nil {
		rb := d.alignUp(at+4*len(syms), ptr)
		seqs := d.alignUp(rb+8, ptr)
		if seqs+3*len(syms) <= len(d.img) {
			info.SeqsOfNamesAddr = d.va(seqs)
			info.SeqsEntrySize = 3
		}
		return nil
	}
	if errPlace != nil {
		errRel = fmt.Errorf("%v; %v", errPlace, errRel)
	}
	if err := d.absoluteAddresses(at, syms, info); err != nil {
		return fmt.Errorf("after token_index: %v; %v", errRel, err)
	}
	return nil
}

// placeRelativeAddresses decodes 7.0+ kallsyms_offsets at off: entry i is
// the symbol's address minus the entry's own address, a signed 32-bit
// value. Zero-filled memory would decode as addresses rising by 4 at the
// table itself, so entries of 0 are refused beyond one, and the addresses
// must be sorted like every kallsyms table.
func (d *decoder) placeRelativeAddresses(off int, syms []Symbol, info *KallsymsInfo) error {
	n := len(syms)
	if off < 0 || off+4*n > len(d.img) {
		return fmt.Errorf("place-relative offsets at image offset %d for %d symbols do not fit", off, n)
	}
	var prev uint64
	zeros := 0
	for i := range syms {
		o := int32(d.u32(off + 4*i))
		if o == 0 {
			if zeros++; zeros > 1 {
				return fmt.Errorf("place-relative kallsyms_offsets at %#x: more than one zero entry", d.va(off))
			}
		}
		a := d.va(off+4*i) + uint64(int64(o))
		if i > 0 && a < prev {
			return fmt.Errorf("place-relative kallsyms_offsets at %#x: symbol %d (%s) at %#x is below the previous one at %#x", d.va(off), i, syms[i].Name, a, prev)
		}
		prev = a
		syms[i].Addr = a
	}
	if n > 1 && syms[0].Addr == syms[n-1].Addr {
		return fmt.Errorf("place-relative kallsyms_offsets at %#x: all %d symbols at %#x", d.va(off), n, syms[0].Addr)
	}
	info.AddressesAddr = d.va(off)
	info.Addressing = AddrPlaceRelative
	info.RelativeBase, info.RelativeBaseAddr, info.NumAbsolute = 0, 0, 0
	return nil
}

// addressesBeforeNumSyms reads the older tables that precede num_syms.
func (d *decoder) addressesBeforeNumSyms(numSyms int, syms []Symbol, info *KallsymsInfo) error {
	ptr := info.PointerSize
	n := len(syms)
	// base-relative: relative_base is the pointer just before num_syms, the
	// offsets end at or just before it.
	rb := numSyms - ptr
	off := d.alignDown(rb-4*n, ptr)
	errRel := d.relativeAddresses(off, syms, info)
	if errRel == nil {
		return nil
	}
	if err := d.absoluteAddresses(numSyms-ptr*n, syms, info); err != nil {
		return fmt.Errorf("before num_syms: %v; %v", errRel, err)
	}
	return nil
}

// relativeAddresses decodes kallsyms_offsets at off, followed by
// kallsyms_relative_base at the next label.
func (d *decoder) relativeAddresses(off int, syms []Symbol, info *KallsymsInfo) error {
	n := len(syms)
	ptr := info.PointerSize
	rb := d.alignUp(off+4*n, ptr)
	if off < 0 || rb+ptr > len(d.img) {
		return fmt.Errorf("offsets at image offset %d for %d symbols do not fit", off, n)
	}
	var base uint64
	if ptr == 8 {
		base = d.u64(rb)
	} else {
		base = uint64(d.u32(rb))
	}
	absPerCPU := false
	for i := 0; i < n; i++ {
		if int32(d.u32(off+4*i)) < 0 {
			absPerCPU = true
			break
		}
	}
	absolute, minRel := 0, uint64(0)
	haveRel := false
	var prev uint64
	for i := range syms {
		o := d.u32(off + 4*i)
		var a uint64
		switch {
		case !absPerCPU:
			a = base + uint64(o)
		case int32(o) >= 0:
			a = uint64(o)
			absolute++
		default:
			a = base - 1 - uint64(int64(int32(o)))
			if !haveRel || a < minRel {
				minRel, haveRel = a, true
			}
		}
		if i > 0 && a < prev {
			return fmt.Errorf("kallsyms_offsets at %#x: symbol %d (%s) at %#x is below the previous one at %#x", d.va(off), i, syms[i].Name, a, prev)
		}
		prev = a
		syms[i].Addr = a
	}
	// scripts/kallsyms takes the lowest relocatable address as the base.
	if !absPerCPU && d.u32(off) != 0 || absPerCPU && (!haveRel || minRel != base) {
		return fmt.Errorf("kallsyms_relative_base at %#x (%#x) is not the lowest symbol's address", d.va(rb), base)
	}
	info.AddressesAddr = d.va(off)
	info.RelativeBaseAddr = d.va(rb)
	info.RelativeBase = base
	info.NumAbsolute = absolute
	info.Addressing = AddrRelative
	if absPerCPU {
		info.Addressing = AddrRelativeAbsolutePerCPU
	}
	return nil
}

// absoluteAddresses decodes kallsyms_addresses, one pointer per symbol.
func (d *decoder) absoluteAddresses(off int, syms []Symbol, info *KallsymsInfo) error {
	ptr := info.PointerSize
	n := len(syms)
	if off < 0 || off+ptr*n > len(d.img) {
		return fmt.Errorf("addresses at image offset %d for %d symbols do not fit", off, n)
	}
	var prev uint64
	for i := range syms {
		var a uint64
		if ptr == 8 {
			a = d.u64(off + 8*i)
		} else {
			a = uint64(d.u32(off + 4*i))
		}
		if i > 0 && a < prev {
			return fmt.Errorf("kallsyms_addresses at %#x: symbol %d (%s) at %#x is below the previous one at %#x", d.va(off), i, syms[i].Name, a, prev)
		}
		prev = a
		syms[i].Addr = a
	}
	if n > 1 && syms[0].Addr == syms[n-1].Addr {
		return fmt.Errorf("kallsyms_addresses at %#x: all %d symbols at %#x", d.va(off), n, syms[0].Addr)
	}
	info.AddressesAddr = d.va(off)
	info.Addressing = AddrAbsolute
	info.RelativeBase = 0
	info.RelativeBaseAddr = 0
	info.NumAbsolute = 0
	return nil
}
