package introspect

import (
	"context"
	"testing"

	"github.com/hvpatch/hvpatch/internal/testguest"
)

// TestBuildCacheGuests: two guests of one kernel build (each with its own
// KASLR slide); the second attach through the cache is a hit and gives
// what a full Open of that guest gives.
func TestBuildCacheGuests(t *testing.T) {
	testguest.Need(t)
	k, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	a, b := attachGuest(t, k), attachGuest(t, k)
	c := &BuildCache{}
	ctx := context.Background()
	if _, err := OpenCached(ctx, a.mem, a.cpus, c); err != nil {
		t.Fatal(err)
	}
	got, err := OpenCached(ctx, b.mem, b.cpus, c)
	if err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Hits != 1 || st.Misses != 1 || st.Builds != 1 {
		t.Fatalf("cache stats %+v, want one miss then one hit", st)
	}
	want := b.k
	t.Logf("slides %#x and %#x; cached attach %v (full %v)", a.k.Slide, want.Slide, got.AttachTime, want.AttachTime)
	if got.Slide != want.Slide || got.TextStart != want.TextStart || got.TextEnd != want.TextEnd || got.PhysBase != want.PhysBase ||
		got.DirectMapBase != want.DirectMapBase || got.Banner != want.Banner || got.CR3 != want.CR3 || got.BTF == nil {
		t.Fatalf("cached kernel differs: got %+v\nwant %+v", got, want)
	}
	if got.Symbols.Len() != want.Symbols.Len() {
		t.Fatalf("%d symbols, want %d", got.Symbols.Len(), want.Symbols.Len())
	}
	all, wall := got.Symbols.All(), want.Symbols.All()
	for i := range wall {
		if all[i] != wall[i] {
			t.Fatalf("symbol %d: %+v, want %+v", i, all[i], wall[i])
		}
	}
	if off, err := got.Offset("task_struct.tasks"); err != nil || off == 0 {
		t.Fatalf("BTF through the cache: task_struct.tasks %d, %v", off, err)
	}
	tasks, err := got.Tasks()
	if err != nil || len(tasks) == 0 {
		t.Fatalf("tasks through the cached kernel: %d, %v", len(tasks), err)
	}
}
