package introspect

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/cilium/ebpf/btf"
)

// ErrNoBTF is returned by layout queries on a kernel built without BTF.
var ErrNoBTF = errors.New("kernel has no BTF")

// Field is where a member lives inside its outermost struct, and its type.
type Field struct {
	Offset uint64
	Size   uint64
	Type   btf.Type
}

// FieldOf resolves a member path against BTF: "task_struct.tasks",
// "task_struct.thread.sp", "module.mem[1].size". Anonymous structs and
// unions are searched through, the way C lets you name their members
// directly. Bitfields are refused: they have no byte offset.
func FieldOf(spec *btf.Spec, path string) (Field, error) {
	if spec == nil {
		return Field{}, ErrNoBTF
	}
	parts := strings.Split(path, ".")
	if len(parts) < 2 || parts[0] == "" {
		return Field{}, fmt.Errorf("BTF path %q: want TYPE.MEMBER[.MEMBER...]", path)
	}
	typ, err := compositeByName(spec, parts[0])
	if err != nil {
		return Field{}, fmt.Errorf("BTF path %q: %w", path, err)
	}
	outer, err := btf.Sizeof(typ)
	if err != nil {
		return Field{}, fmt.Errorf("BTF path %q: %w", path, err)
	}
	var off uint64
	for _, part := range parts[1:] {
		name, indexes, err := splitIndexes(part)
		if err != nil {
			return Field{}, fmt.Errorf("BTF path %q: %w", path, err)
		}
		m, moff, ok, err := findMember(typ, name)
		if err != nil {
			return Field{}, fmt.Errorf("BTF path %q: %w", path, err)
		}
		if !ok {
			return Field{}, fmt.Errorf("BTF path %q: %s has no member %q", path, describe(typ), name)
		}
		if m.BitfieldSize != 0 || moff%8 != 0 {
			return Field{}, fmt.Errorf("BTF path %q: member %q is a bitfield", path, name)
		}
		off += moff / 8
		typ = m.Type
		for _, idx := range indexes {
			arr, ok := btf.UnderlyingType(typ).(*btf.Array)
			if !ok {
				return Field{}, fmt.Errorf("BTF path %q: %q is not an array", path, name)
			}
			if idx >= uint64(arr.Nelems) {
				return Field{}, fmt.Errorf("BTF path %q: index %d out of range (%s has %d elements)", path, idx, name, arr.Nelems)
			}
			esize, err := btf.Sizeof(arr.Type)
			if err != nil {
				return Field{}, fmt.Errorf("BTF path %q: %w", path, err)
			}
			// idx < Nelems < 2^32 and esize < 2^32 (or the whole array would
			// not fit its struct, checked below): no overflow.
			if uint64(esize) > uint64(outer) {
				return Field{}, fmt.Errorf("BTF path %q: element of %d bytes in a struct of %d", path, esize, outer)
			}
			off += idx * uint64(esize)
			typ = arr.Type
		}
		if off > uint64(outer) {
			return Field{}, fmt.Errorf("BTF path %q: offset %d lies outside %s (%d bytes)", path, off, parts[0], outer)
		}
	}
	size, err := btf.Sizeof(typ)
	if err != nil {
		return Field{}, fmt.Errorf("BTF path %q: %w", path, err)
	}
	// A member must lie inside its outermost struct: the guest's BTF says
	// where to read, and a field outside what is read would be out of
	// range (or, trusted, a huge allocation).
	if uint64(size) > uint64(outer) || off > uint64(outer)-uint64(size) {
		return Field{}, fmt.Errorf("BTF path %q: member of %d bytes at offset %d does not fit in %s (%d bytes)", path, size, off, parts[0], outer)
	}
	return Field{Offset: off, Size: uint64(size), Type: typ}, nil
}

// SizeOf is the size of a named struct or union.
func SizeOf(spec *btf.Spec, name string) (uint64, error) {
	if spec == nil {
		return 0, ErrNoBTF
	}
	typ, err := compositeByName(spec, name)
	if err != nil {
		return 0, err
	}
	n, err := btf.Sizeof(typ)
	return uint64(n), err
}

// compositeByName finds the complete definition of a struct or union
// (forward declarations and same-named typedefs are skipped).
// EnumValue returns the value of one enumerator of a named enum
// ("system_states", "SYSTEM_RUNNING"): enums gain members between kernel
// versions, so a value is read from the guest's BTF rather than assumed.
func EnumValue(spec *btf.Spec, enum, name string) (int64, error) {
	if spec == nil {
		return 0, ErrNoBTF
	}
	var e *btf.Enum
	if err := spec.TypeByName(enum, &e); err != nil {
		return 0, fmt.Errorf("BTF enum %s: %w", enum, err)
	}
	for _, v := range e.Values {
		if v.Name == name {
			if e.Signed {
				return int64(v.Value), nil
			}
			if v.Value > 1<<63-1 {
				return 0, fmt.Errorf("BTF enum %s: %s = %d does not fit an int64", enum, name, v.Value)
			}
			return int64(v.Value), nil
		}
	}
	return 0, fmt.Errorf("BTF enum %s has no %s", enum, name)
}

func compositeByName(spec *btf.Spec, name string) (btf.Type, error) {
	types, err := spec.AnyTypesByName(name)
	if err != nil {
		return nil, fmt.Errorf("no type %q in BTF", name)
	}
	for _, t := range types {
		switch t.(type) {
		case *btf.Struct, *btf.Union:
			return t, nil
		}
	}
	return nil, fmt.Errorf("%q is not a struct or union in BTF", name)
}

// maxAnonDepth bounds how deep anonymous structs and unions nest (the
// kernel's go 4 or 5 levels deep).
const maxAnonDepth = 32

// findMember looks for name in a struct or union, descending into anonymous
// members. The offset is in bits from the start of typ. Each anonymous type
// is searched once, and to a bounded depth: a guest's BTF may make an
// anonymous member of a struct the struct itself.
func findMember(typ btf.Type, name string) (btf.Member, uint64, bool, error) {
	return findMemberIn(typ, name, map[btf.Type]bool{}, 0)
}

func findMemberIn(typ btf.Type, name string, seen map[btf.Type]bool, depth int) (btf.Member, uint64, bool, error) {
	if depth > maxAnonDepth {
		return btf.Member{}, 0, false, fmt.Errorf("anonymous members nest more than %d deep looking for %q: corrupt BTF", maxAnonDepth, name)
	}
	typ = btf.UnderlyingType(typ)
	if seen[typ] {
		return btf.Member{}, 0, false, nil
	}
	seen[typ] = true
	var members []btf.Member
	switch t := btf.UnderlyingType(typ).(type) {
	case *btf.Struct:
		members = t.Members
	case *btf.Union:
		members = t.Members
	default:
		return btf.Member{}, 0, false, nil
	}
	for _, m := range members {
		if m.Name == name {
			return m, uint64(m.Offset), true, nil
		}
	}
	for _, m := range members {
		if m.Name != "" {
			continue
		}
		inner, off, ok, err := findMemberIn(m.Type, name, seen, depth+1)
		if err != nil {
			return btf.Member{}, 0, false, err
		}
		if ok {
			return inner, uint64(m.Offset) + off, true, nil
		}
	}
	return btf.Member{}, 0, false, nil
}

// splitIndexes splits "mem[1]" into "mem" and [1].
func splitIndexes(part string) (string, []uint64, error) {
	name, rest, _ := strings.Cut(part, "[")
	if name == "" {
		return "", nil, fmt.Errorf("empty member name in %q", part)
	}
	var idx []uint64
	for rest != "" {
		num, after, ok := strings.Cut(rest, "]")
		if !ok {
			return "", nil, fmt.Errorf("unclosed [ in %q", part)
		}
		n, err := strconv.ParseUint(num, 0, 64)
		if err != nil {
			return "", nil, fmt.Errorf("bad index %q in %q", num, part)
		}
		idx = append(idx, n)
		if after != "" && !strings.HasPrefix(after, "[") {
			return "", nil, fmt.Errorf("unexpected %q after index in %q", after, part)
		}
		rest = strings.TrimPrefix(after, "[")
	}
	return name, idx, nil
}

func describe(t btf.Type) string {
	switch u := btf.UnderlyingType(t).(type) {
	case *btf.Struct:
		return "struct " + u.Name
	case *btf.Union:
		return "union " + u.Name
	}
	return fmt.Sprintf("%v", t)
}
