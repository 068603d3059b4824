package linker

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// Runtime constants get the guest variable's value: the pointer's 8 bytes
// and the shift count's low byte, at the immediates the sections list.
func TestRuntimeConsts(t *testing.T) {
	obj, err := Load("testdata/runtimeconst/rc.o")
	if err != nil {
		t.Fatal(err)
	}
	const userPtrMax, dHashShift = 0x7ffffffff000, 18
	vars := map[string]uint64{"USER_PTR_MAX": 0xffffffff82000000, "d_hash_shift": 0xffffffff82000008}
	resolve := func(name string) (uint64, bool) { a, ok := vars[name]; return a, ok }
	read := func(addr uint64, b []byte) error {
		var v [8]byte
		switch addr {
		case vars["USER_PTR_MAX"]:
			binary.LittleEndian.PutUint64(v[:], userPtrMax)
		case vars["d_hash_shift"]:
			binary.LittleEndian.PutUint32(v[:], dHashShift)
		default:
			return errors.New("no such address")
		}
		copy(b, v[:])
		return nil
	}
	lay := Layout{TextBase: 0xffffffffa0000000, DataBase: 0xffffffffa0100000, TextLimit: 4096, DataLimit: 4096}
	img, err := obj.LinkWithOptions("rc_ptr", lay, resolve, Options{ReadGuest: read, Resolve: resolve})
	if err != nil {
		t.Fatal(err)
	}
	ptr := img.Map.Symbols[0]
	for _, s := range img.Map.Symbols {
		if s.Name == "rc_ptr" {
			ptr = s
		}
	}
	code := img.Text[ptr.Addr-lay.TextBase:]
	// movabs $imm64, %rax: 48 b8 imm64
	if code[0] != 0x48 || code[1] != 0xb8 || binary.LittleEndian.Uint64(code[2:]) != userPtrMax {
		t.Fatalf("rc_ptr: % x, want movabs $%#x", code[:10], userPtrMax)
	}
	var shr []byte
	for _, s := range img.Map.Symbols {
		if s.Name == "rc_shift" {
			shr = img.Text[s.Addr-lay.TextBase:]
		}
	}
	// shr $imm8, %eax: c1 e8 imm8 (after the mov of the argument)
	if i := strings.Index(string(shr[:min(16, len(shr))]), "\xc1\xe8"); i < 0 || shr[i+2] != dHashShift {
		t.Fatalf("rc_shift: % x, want shr $%d", shr, dHashShift)
	}
	if len(img.Map.Notes) < 2 {
		t.Fatalf("notes %v", img.Map.Notes)
	}
	// Without the guest's values, refused with the constant's name.
	if _, err := obj.LinkWithOptions("rc_ptr", lay, resolve, Options{}); err == nil || !strings.Contains(err.Error(), "USER_PTR_MAX") {
		t.Fatalf("no ReadGuest: %v", err)
	}
}
