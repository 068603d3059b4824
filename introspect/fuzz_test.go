package introspect

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/hvpatch/hvpatch/symbols"
)

// fuzzTables is guest memory for the page-walk fuzzer: 8 MiB, with the
// fuzzer's bytes as the page-table pages from 6 MiB (the root first).
func fuzzTables(tables []byte) *sliceMem {
	m := &sliceMem{b: make([]byte, 8<<20)}
	copy(m.b[6<<20:], tables[:min(len(tables), 2<<20)])
	return m
}

// seedTables builds real-shaped tables: the kernel image in 2 MiB pages,
// a 4 KiB vmalloc page, the direct map in a 1 GiB page.
func seedTables(la57 bool) []byte {
	pt := newPageTables(8<<20, 6<<20, la57)
	for i := uint64(0); i < 3; i++ {
		pt.mapPage(DefaultText+i*Size2M, i*Size2M, Size2M, rw, ptePresent)
	}
	pt.mapPage(0xffffc90000000000, 0x5000, Size4K, rw, rw|pteNX)
	pt.mapPage(defaultDirectMap4, 0, Size1G, rw, rw|pteNX)
	return bytes.Clone(pt.mem.b[6<<20 : pt.next])
}

// FuzzPageWalk: any page tables translate or fail with an error, and
// Mappings stays within its bounds.
func FuzzPageWalk(f *testing.F) {
	f.Add(seedTables(false), uint64(DefaultText+0x1234), false)
	f.Add(seedTables(true), uint64(0xffffc90000000010), true)
	self := make([]byte, 4096)
	for i := 0; i < 512; i++ {
		binary.LittleEndian.PutUint64(self[i*8:], 6<<20|rw)
	}
	f.Add(self, uint64(KernelImageStart), false)
	f.Fuzz(func(t *testing.T, tables []byte, va uint64, la57 bool) {
		as := NewAddressSpace(fuzzTables(tables), 6<<20, la57)
		if tr, err := as.Translate(va); err == nil && tr.PageSize != Size4K && tr.PageSize != Size2M && tr.PageSize != Size1G {
			t.Fatalf("page size %#x", tr.PageSize)
		}
		var b [16]byte
		_ = as.ReadVirt(va, b[:])
		maps, err := as.Mappings(KernelImageStart, KernelImageEnd)
		if err == nil {
			for _, m := range maps {
				if m.Size == 0 || m.VA < KernelImageStart || m.VA >= KernelImageEnd {
					t.Fatalf("mapping %+v", m)
				}
			}
		}
		if len(maps) > maxMappings+512 {
			t.Fatalf("%d mappings", len(maps))
		}
	})
}

// specBytes is raw BTF of types.
func specBytes(tb testing.TB, types ...btf.Type) []byte {
	b, err := btf.NewBuilder(types, nil)
	if err != nil {
		tb.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return raw
}

// FuzzFieldOf: any BTF blob, any member path: an error or a field inside
// its struct.
func FuzzFieldOf(f *testing.F) {
	self := &btf.Struct{Name: "task_struct", Size: 16}
	self.Members = []btf.Member{{Name: "pid", Type: tU32}, {Type: self, Offset: 64}}
	f.Add(specBytes(f, taskStruct(1024)), "task_struct.thread.sp")
	f.Add(specBytes(f, moduleStruct(0x500, 7, 24)), "module.mem[3].size")
	f.Add(specBytes(f, self), "task_struct.nosuch")
	f.Fuzz(func(t *testing.T, raw []byte, path string) {
		spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
		if err != nil {
			return
		}
		fld, err := FieldOf(spec, path)
		if err != nil {
			return
		}
		name, _, _ := bytes.Cut([]byte(path), []byte("."))
		size, err := SizeOf(spec, string(name))
		if err != nil || fld.Offset+fld.Size > size || fld.Offset+fld.Size < fld.Offset {
			t.Fatalf("%s: field %+v in a struct of %d (%v)", path, fld, size, err)
		}
	})
}

// walkMem puts the fuzzer's bytes at guest-physical 1 MiB (direct-mapped
// at defaultDirectMap4+1 MiB), where the walks start.
func walkKernel(t testing.TB, spec *btf.Spec, data []byte, sym string) *Kernel {
	k, pt := guestKernel(t, spec, symbols.Symbol{Name: sym, Addr: defaultDirectMap4 + 0x100000, Type: 'D'})
	copy(pt.mem.b[0x100000:], data[:min(len(data), 1<<20)])
	return k
}

// FuzzTaskWalk: any task_struct size and any memory under the task list.
func FuzzTaskWalk(f *testing.F) {
	seed := make([]byte, 3*4096)
	for i, next := range []uint64{1, 2, 0} {
		b := seed[i*4096:]
		binary.LittleEndian.PutUint32(b[4:], uint32(i))
		binary.LittleEndian.PutUint64(b[16:], defaultDirectMap4+0x100000+next*4096+16)
		binary.LittleEndian.PutUint64(b[32:], defaultDirectMap4+0x100000)
		copy(b[48:], "init")
	}
	f.Add(seed, uint32(1024))
	f.Add(seed, uint32(16))
	f.Add(seed, uint32(0xfffffff0))
	f.Fuzz(func(t *testing.T, data []byte, size uint32) {
		k := walkKernel(t, loadTypes(t, taskStruct(size)), data, "init_task")
		tasks, err := k.Tasks()
		if err == nil && len(tasks) == 0 {
			t.Fatal("no tasks and no error")
		}
	})
}

// FuzzModuleWalk: any struct module layout and any memory under the list.
func FuzzModuleWalk(f *testing.F) {
	seed := make([]byte, 3*4096)
	binary.LittleEndian.PutUint64(seed, defaultDirectMap4+0x101000+8)
	binary.LittleEndian.PutUint64(seed[0x1000+8:], defaultDirectMap4+0x102000+8)
	binary.LittleEndian.PutUint64(seed[0x2000+8:], defaultDirectMap4+0x100000)
	copy(seed[0x1000+24:], "ext4")
	copy(seed[0x2000+24:], "virtio_blk")
	f.Add(seed, uint32(0x500), uint32(7), uint32(24))
	f.Add(seed, uint32(0x2000), uint32(0xffffffff), uint32(24))
	f.Add(seed, uint32(0x480), uint32(7), uint32(0x470))
	f.Fuzz(func(t *testing.T, data []byte, size, elems, nameOff uint32) {
		k := walkKernel(t, loadTypes(t, moduleStruct(size, elems, nameOff%0x10000)), data, "modules")
		_, _ = k.Modules()
	})
}
