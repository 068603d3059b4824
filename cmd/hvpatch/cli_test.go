package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/internal/testguest"
)

// The test binary doubles as the hvpatch command, so the tests run the
// real CLI (exit status, stdout, stderr) without a separate build.
func TestMain(m *testing.M) {
	if os.Getenv("HVPATCH_CLI_UNDER_TEST") == "1" {
		os.Args = append([]string{"hvpatch"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runCLI runs the CLI with a clean environment and a private daemon socket
// where nothing serves (args may name another: the last --daemon-socket
// wins), so it never reaches an hvpatchd serving on the host.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	noDaemon := filepath.Join(t.TempDir(), "no-hvpatchd.sock")
	cmd := exec.Command(os.Args[0], append([]string{"--socket", testguest.LibvirtSocket(), "--daemon-socket", noDaemon}, args...)...)
	cmd.Env = []string{"HVPATCH_CLI_UNDER_TEST=1", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + t.TempDir(), "LANG=C"}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

func TestHexDump(t *testing.T) {
	var b bytes.Buffer
	hexDump(&b, 0x1000, []byte("hvpatch\x00\x01 reads guest memory"))
	want := "0000000000001000  68 76 70 61 74 63 68 00  01 20 72 65 61 64 73 20  |hvpatch.. reads |\n" +
		"0000000000001010  67 75 65 73 74 20 6d 65  6d 6f 72 79              |guest memory|\n"
	lines := strings.Split(b.String(), "\n")
	if b.String() != want || strings.Index(lines[0], "|") != strings.Index(lines[1], "|") {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// TestCLIOffline reads a raw image through "mem read --dump --raw-base".
func TestCLIOffline(t *testing.T) {
	img := []byte("0123456789abcdefHVPATCH-RAW-IMAGE")
	path := filepath.Join(t.TempDir(), "mem.raw")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	out, stderr, code := runCLI(t, "mem", "read", "--dump", path, "--raw-base", "0x10000", "--phys", "0x10010", "17", "--json")
	var res struct{ Hex string }
	json.Unmarshal([]byte(out), &res)
	if code != 0 || res.Hex != hex.EncodeToString(img[16:]) {
		t.Errorf("raw image read: exit %d, %q, stderr %q", code, out, stderr)
	}
	_, stderr, code = runCLI(t, "mem", "read", "--dump", path, "--raw-base", "0x10000", "--phys", "0x10020", "2")
	if code == 0 || !strings.Contains(stderr, "0x10021") {
		t.Errorf("read past the image: exit %d, stderr %q; want an error naming 0x10021", code, stderr)
	}
	_, stderr, code = runCLI(t, "mem", "read", "--dump", path, "--phys", "0", "2")
	if code == 0 || !strings.Contains(stderr, path) {
		t.Errorf("raw file read as ELF: exit %d, stderr %q; want an error naming the file", code, stderr)
	}
}

func TestCLIErrors(t *testing.T) {
	_, stderr, code := runCLI(t, "mem", "read", "x", "--phys", "zz", "16")
	if code == 0 || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, `--phys "zz"`) {
		t.Errorf("bad --phys: exit %d, stderr %q; want non-zero and one line naming the flag", code, stderr)
	}
}

// TestCLI runs "hvpatch domains" and "hvpatch mem read" against a real guest.
func TestCLI(t *testing.T) {
	testguest.Need(t)
	k, err := testguest.KernelSeries("6.1")
	if err != nil {
		t.Fatal(err)
	}
	g := testguest.Start(t, testguest.Options{Kernel: k, VCPUs: 1, MemoryMiB: 512})

	out, stderr, code := runCLI(t, "domains", "--json")
	if code != 0 {
		t.Fatalf("domains --json: exit %d: %s", code, stderr)
	}
	var doms []hypervisor.DomainInfo
	if err := json.Unmarshal([]byte(out), &doms); err != nil {
		t.Fatalf("domains --json printed %q: %v", out, err)
	}
	listed := false
	for _, d := range doms {
		listed = listed || (d.Name == g.Name && d.UUID == g.UUID && d.State == "running")
	}
	if !listed {
		t.Errorf("domains --json does not list %s (%s) running: %s", g.Name, g.UUID, out)
	}
	out, _, code = runCLI(t, "domains")
	if code != 0 || !strings.Contains(out, g.Name) || !strings.HasPrefix(out, "ID") {
		t.Errorf("domains (table): exit %d, output %q", code, out)
	}

	// Pause the guest so memory holds still between the CLI and xp.
	ctx := context.Background()
	c, err := hypervisor.Connect(ctx, hypervisor.Config{Socket: testguest.LibvirtSocket()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d, err := c.LookupDomain(ctx, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	cpus, err := d.CPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	defer d.Resume(ctx)
	// The top-level page table and low memory: both hold data.
	for _, addr := range []uint64{cpus[0].CR3 &^ 0xfff, cpus[0].CR3&^0xfff + 0x800, 0x1000} {
		want := xp(t, d, addr, 64)
		out, stderr, code := runCLI(t, "mem", "read", g.Name, "--phys", fmt.Sprintf("%#x", addr), "64", "--json")
		if code != 0 {
			t.Fatalf("mem read --json at %#x: exit %d: %s", addr, code, stderr)
		}
		var res struct {
			Phys   string
			Length int
			Hex    string
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatal(err)
		}
		got, _ := hex.DecodeString(res.Hex)
		if !bytes.Equal(got, want) || res.Length != 64 || res.Phys != fmt.Sprintf("%#x", addr) {
			t.Errorf("mem read --json at %#x: %+v, xp says %x", addr, res, want)
		}
		out, _, code = runCLI(t, "mem", "read", g.UUID, "--phys", fmt.Sprint(addr), "64", "--backend", "process")
		if text := parseHexDump(t, out); code != 0 || !bytes.Equal(text, want) {
			t.Errorf("mem read (text, process backend) at %#x: exit %d, bytes %x, xp says %x", addr, code, text, want)
		}
	}
	_, stderr, code = runCLI(t, "mem", "read", g.Name, "--phys", "0xfec00000", "16")
	if code == 0 || !strings.Contains(stderr, "0xfec00000") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("read of MMIO: exit %d, stderr %q; want an error line naming the address", code, stderr)
	}
	_, stderr, code = runCLI(t, "mem", "read", "hvpatch-no-such-domain", "--phys", "0", "16")
	if code == 0 || !strings.Contains(stderr, "hvpatch-no-such-domain") {
		t.Errorf("unknown domain: exit %d, stderr %q", code, stderr)
	}
}

func parseHexDump(t *testing.T, s string) []byte {
	var b []byte
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		fields := strings.Fields(line)
		for _, f := range fields[1:] {
			if strings.HasPrefix(f, "|") {
				break
			}
			v, err := strconv.ParseUint(f, 16, 8)
			if err != nil {
				t.Fatalf("hex dump line %q", line)
			}
			b = append(b, byte(v))
		}
	}
	return b
}

func xp(t *testing.T, d *hypervisor.Domain, gpa uint64, n int) []byte {
	out, err := d.HMP(context.Background(), fmt.Sprintf("xp /%dxb %#x", n, gpa))
	if err != nil {
		t.Fatal(err)
	}
	var b []byte
	for _, line := range strings.Split(out, "\n") {
		if _, vals, ok := strings.Cut(line, ":"); ok {
			for _, f := range strings.Fields(vals) {
				v, _ := strconv.ParseUint(f, 0, 8)
				b = append(b, byte(v))
			}
		}
	}
	if len(b) != n {
		t.Fatalf("xp %#x: %q", gpa, out)
	}
	return b
}
