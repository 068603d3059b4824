package hypervisor

import "fmt"

// span is the part of an access that falls in one region: p[lo:hi] is at
// byte off of region idx.
type span struct {
	idx    int
	off    uint64
	lo, hi int
}

// splitAccess cuts the access [gpa, gpa+n) along the sorted, non-overlapping
// regions. Any byte outside them fails the whole access, before anything
// is touched, so a failed write changes nothing.
func splitAccess(regions []Region, op string, gpa uint64, n int) ([]span, error) {
	if n == 0 {
		return nil, nil
	}
	if gpa+uint64(n) < gpa {
		return nil, &AccessError{Op: op, GPA: gpa, Len: n, What: "range wraps around the address space"}
	}
	var spans []span
	cur, done := gpa, 0
	for done < n {
		i := findRegion(regions, cur)
		if i < 0 {
			return nil, &AccessError{Op: op, GPA: gpa, Len: n, What: fmt.Sprintf("%#x is not RAM (hole or MMIO)", cur)}
		}
		r := regions[i]
		k := int(min(uint64(n-done), r.End()-cur))
		spans = append(spans, span{idx: i, off: cur - r.GPA, lo: done, hi: done + k})
		done += k
		cur += uint64(k)
	}
	return spans, nil
}

// findRegion returns the index of the region holding gpa, or -1.
func findRegion(regions []Region, gpa uint64) int {
	lo, hi := 0, len(regions)
	for lo < hi {
		m := (lo + hi) / 2
		switch r := regions[m]; {
		case gpa < r.GPA:
			hi = m
		case gpa >= r.End():
			lo = m + 1
		default:
			return m
		}
	}
	return -1
}
