package objdiff

import (
	"bytes"
	"debug/dwarf"
	"debug/elf"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Layout is the shape of one named struct or union type as the compiler
// laid it out: its size and each member's offset.
type Layout struct {
	Size    int64
	Members string // "name@offset:size,..." in declaration order
}

// maxLayoutEntries bounds the DWARF walk of one object.
const maxLayoutEntries = 4 << 20

// Layouts reads the named struct and union types of an object's DWARF.
// ok is false when the object carries no debug information.
func Layouts(obj []byte) (map[string]Layout, bool, error) {
	ef, err := elf.NewFile(bytes.NewReader(obj))
	if err != nil {
		return nil, false, err
	}
	if ef.Section(".debug_info") == nil {
		return nil, false, nil
	}
	d, err := ef.DWARF()
	if err != nil {
		return nil, false, fmt.Errorf("reading DWARF: %w", err)
	}
	out := map[string]Layout{}
	r := d.Reader()
	for n := 0; ; n++ {
		if n > maxLayoutEntries {
			return nil, false, errors.New("DWARF: too many entries")
		}
		e, err := r.Next()
		if err != nil {
			return nil, false, fmt.Errorf("reading DWARF: %w", err)
		}
		if e == nil {
			break
		}
		if e.Tag != dwarf.TagStructType && e.Tag != dwarf.TagUnionType {
			continue
		}
		name, _ := e.Val(dwarf.AttrName).(string)
		size, hasSize := e.Val(dwarf.AttrByteSize).(int64)
		if name == "" || !hasSize || !e.Children {
			if e.Children {
				r.SkipChildren()
			}
			continue
		}
		var members []string
		for {
			c, err := r.Next()
			if err != nil {
				return nil, false, fmt.Errorf("reading DWARF: %w", err)
			}
			if c == nil || c.Tag == 0 {
				break
			}
			if c.Tag == dwarf.TagMember {
				mname, _ := c.Val(dwarf.AttrName).(string)
				off, _ := c.Val(dwarf.AttrDataMemberLoc).(int64)
				bit, _ := c.Val(dwarf.AttrDataBitOffset).(int64)
				members = append(members, fmt.Sprintf("%s@%d.%d", mname, off, bit))
			}
			if c.Children {
				r.SkipChildren()
			}
		}
		kind := "struct "
		if e.Tag == dwarf.TagUnionType {
			kind = "union "
		}
		out[kind+name] = Layout{Size: size, Members: strings.Join(members, ",")}
	}
	return out, true, nil
}

// LayoutChanges compares the types two objects both define and describes
// each whose layout differs. A fix that changes a layout changes every
// object of that type the running kernel already holds: a hot patch cannot.
func LayoutChanges(before, after []byte) ([]string, error) {
	a, okA, err := Layouts(before)
	if err != nil {
		return nil, err
	}
	b, okB, err := Layouts(after)
	if err != nil {
		return nil, err
	}
	if !okA || !okB {
		return nil, nil
	}
	var out []string
	for name, la := range a {
		lb, ok := b[name]
		if !ok || la == lb {
			continue
		}
		if la.Size != lb.Size {
			out = append(out, fmt.Sprintf("%s: size %d → %d bytes", name, la.Size, lb.Size))
		} else {
			out = append(out, fmt.Sprintf("%s: members move (%s → %s)", name, la.Members, lb.Members))
		}
	}
	sort.Strings(out)
	return out, nil
}
