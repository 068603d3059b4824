package testguest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/template"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// Options describe a test guest. Zero values give the defaults.
type Options struct {
	Kernel    Kernel
	VCPUs     int    // default 2
	MemoryMiB int    // default 512
	Accel     string // "kvm", "tcg" or "" (probe; HVPATCH_TEST_ACCEL overrides)
	// ReadyTimeout bounds the wait for the guest's ready line (default 90 s).
	ReadyTimeout time.Duration
}

// Guest is a running test guest. It is destroyed by the test's cleanup.
type Guest struct {
	Name    string
	UUID    string
	Kernel  Kernel
	Accel   string // "kvm" or "tcg", what the guest actually runs on
	VCPUs   int
	Dir     string // per-guest files: console.log, shell.sock, domain.xml
	Release string // from the ready line

	tb           testing.TB
	lv           *libvirt.Libvirt
	dom          libvirt.Domain
	mu           sync.Mutex // one shell command at a time
	shell        net.Conn
	shellBroken  error
	expectCrash  bool
	destroyOnce  sync.Once
	bootDuration time.Duration
}

// consoleTrouble are console lines that mean the guest kernel is in trouble.
var consoleTrouble = regexp.MustCompile(`(?m)^.*(BUG:|Oops|general protection fault|invalid opcode|Kernel panic|kernel BUG at|WARNING: CPU:).*$`)

var nameCounter struct {
	sync.Mutex
	n int
}

// Start boots a guest and registers its destruction with tb.Cleanup. At
// cleanup the console is checked: any oops, BUG or panic fails the test.
func Start(tb testing.TB, opt Options) *Guest {
	tb.Helper()
	Need(tb)
	g, err := start(tb, opt)
	if err != nil {
		tb.Fatalf("testguest: %v", err)
	}
	return g
}

func start(tb testing.TB, opt Options) (*Guest, error) {
	if err := prepareHost(); err != nil {
		return nil, err
	}
	if opt.Kernel.Release == "" {
		k, err := KernelSeries("6.1")
		if err != nil {
			return nil, err
		}
		opt.Kernel = k
	}
	if opt.VCPUs == 0 {
		opt.VCPUs = 2
	}
	if opt.MemoryMiB == 0 {
		opt.MemoryMiB = 512
	}
	if opt.ReadyTimeout == 0 {
		opt.ReadyTimeout = 90 * time.Second
	}
	lv, err := connect()
	if err != nil {
		return nil, err
	}
	removeStaleDomains(lv)
	accel := opt.Accel
	if accel == "" {
		if accel, err = probeAccel(lv, opt.Kernel); err != nil {
			lv.Disconnect()
			return nil, err
		}
	}

	nameCounter.Lock()
	nameCounter.n++
	name := fmt.Sprintf("hvpt-%d-%d", os.Getpid(), nameCounter.n)
	nameCounter.Unlock()
	dir, err := os.MkdirTemp("", name+"-")
	if err != nil {
		lv.Disconnect()
		return nil, err
	}
	g := &Guest{Name: name, Kernel: opt.Kernel, Accel: accel, VCPUs: opt.VCPUs, Dir: dir, tb: tb, lv: lv}
	tb.Cleanup(g.cleanup)
	if err := g.boot(opt); err != nil {
		return g, err
	}
	return g, nil
}

func (g *Guest) boot(opt Options) error {
	cache, err := CacheDir()
	if err != nil {
		return err
	}
	xml, err := domainXML(domainParams{
		Name: g.Name, Type: map[string]string{"kvm": "kvm", "tcg": "qemu"}[g.Accel],
		MemoryMiB: opt.MemoryMiB, VCPUs: opt.VCPUs,
		Kernel: opt.Kernel.Vmlinuz(), Initrd: filepath.Join(cache, "initramfs.cpio.gz"),
		Console: g.ConsolePath(), Shell: g.shellPath(),
	})
	if err != nil {
		return err
	}
	os.WriteFile(filepath.Join(g.Dir, "domain.xml"), []byte(xml), 0o644)
	t0 := time.Now()
	dom, err := g.lv.DomainCreateXML(xml, 0)
	if err != nil {
		return fmt.Errorf("creating domain %s: %w", g.Name, err)
	}
	g.dom = dom
	g.UUID = formatUUID(dom.UUID)
	line, err := waitForLine(g.ConsolePath(), readyLine, opt.ReadyTimeout, g.consoleTrouble)
	if err != nil {
		return fmt.Errorf("guest %s (%s, %s) did not become ready: %w\nconsole tail:\n%s",
			g.Name, opt.Kernel.Release, g.Accel, err, tail(g.Console(), 30))
	}
	g.bootDuration = time.Since(t0)
	g.Release = readyLine.FindStringSubmatch(line)[1]
	conn, err := net.Dial("unix", g.shellPath())
	if err != nil {
		return fmt.Errorf("connecting to the guest shell of %s: %w", g.Name, err)
	}
	g.shell = conn
	return g.syncShell(30 * time.Second)
}

// syncShell makes sure the guest shell is reading: input sent before the
// guest opened ttyS1 is dropped by the UART, so probe with numbered echoes
// until one comes back. Lost probes print nothing, and every probe sent
// before the answered one was answered or lost, so nothing is left behind.
func (g *Guest) syncShell(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 4096)
	var got []byte
	for n := 1; time.Now().Before(deadline); n++ {
		marker := fmt.Sprintf("__HVPATCH_SYNC_%d__", n)
		if _, err := fmt.Fprintf(g.shell, "\necho %s\n%s", marker, uartFlush); err != nil {
			return fmt.Errorf("guest shell of %s: %w", g.Name, err)
		}
		g.shell.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			k, err := g.shell.Read(buf)
			got = append(got, buf[:k]...)
			if bytes.Contains(got, []byte(marker+"\n")) {
				g.shell.SetReadDeadline(time.Time{})
				return nil
			}
			if err != nil {
				break
			}
		}
	}
	return fmt.Errorf("guest shell of %s did not answer within %v", g.Name, timeout)
}

// uartFlush follows every input to the guest shell, and is sent again
// whenever the guest stays quiet while a command runs. The emulated 16550's
// receive FIFO raises its interrupt at a trigger level; under TCG the last
// few bytes below it were seen to wait until more input came. Newlines, which
// the shell ignores, push the real input through.
var uartFlush = strings.Repeat("\n", 16)

var readyLine = regexp.MustCompile(`HVPATCH-READY release=(\S+)`)

// BootDuration is the time from domain creation to the ready line.
func (g *Guest) BootDuration() time.Duration { return g.bootDuration }

// Domain is the libvirt handle of the guest (name, UUID, id).
func (g *Guest) Domain() libvirt.Domain { return g.dom }

// ConsolePath is the file the guest's ttyS0 is written to.
func (g *Guest) ConsolePath() string { return filepath.Join(g.Dir, "console.log") }

func (g *Guest) shellPath() string { return filepath.Join(g.Dir, "shell.sock") }

// Console returns everything the guest printed on its console so far.
func (g *Guest) Console() string {
	b, _ := os.ReadFile(g.ConsolePath())
	return string(b)
}

// ConsoleError reports the first sign of kernel trouble on the console.
func (g *Guest) ConsoleError() error { return g.consoleTrouble() }

func (g *Guest) consoleTrouble() error {
	if m := consoleTrouble.FindString(g.Console()); m != "" {
		return fmt.Errorf("guest %s console shows kernel trouble: %s", g.Name, strings.TrimSpace(m))
	}
	return nil
}

// ExpectCrash stops the cleanup from failing the test on console trouble,
// for tests that crash the guest on purpose.
func (g *Guest) ExpectCrash() { g.expectCrash = true }

// Destroy stops the guest now (cleanup does it too; both are safe).
func (g *Guest) Destroy() {
	g.destroyOnce.Do(func() {
		if g.shell != nil {
			g.shell.Close()
		}
		if g.dom.Name != "" {
			g.lv.DomainDestroy(g.dom)
		}
		g.lv.Disconnect()
	})
}

func (g *Guest) cleanup() {
	err := g.consoleTrouble()
	g.Destroy()
	if err != nil && !g.expectCrash {
		g.tb.Errorf("%v\nconsole tail:\n%s", err, tail(g.Console(), 40))
	}
	if g.tb.Failed() || os.Getenv("HVPATCH_KEEP_GUEST_FILES") != "" {
		g.tb.Logf("guest files kept in %s", g.Dir)
		return
	}
	os.RemoveAll(g.Dir)
}

// Run runs a shell command in the guest (stdin is /dev/null, stderr goes
// with stdout) and returns its output. A non-zero exit status is an error
// that carries the output. The timeout default is 60 s.
func (g *Guest) Run(cmd string) (string, error) { return g.RunTimeout(cmd, 60*time.Second) }

// MustRun is Run that fails the test on error.
func (g *Guest) MustRun(cmd string) string {
	g.tb.Helper()
	out, err := g.Run(cmd)
	if err != nil {
		g.tb.Fatalf("guest %s: %v", g.Name, err)
	}
	return out
}

// RunTimeout is Run with an explicit timeout. After a timeout the shell is
// considered lost and every later command fails at once.
func (g *Guest) RunTimeout(cmd string, timeout time.Duration) (string, error) {
	out, status, err := g.run(cmd, timeout)
	if err != nil {
		return out, err
	}
	if status != 0 {
		return out, fmt.Errorf("guest command %q exited %d: %s", cmd, status, tail(out, 10))
	}
	return out, nil
}

func (g *Guest) run(cmd string, timeout time.Duration) (string, int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shellBroken != nil {
		return "", -1, fmt.Errorf("guest shell unusable: %w", g.shellBroken)
	}
	nonce := make([]byte, 8)
	rand.Read(nonce)
	marker := "__HVPATCH_DONE_" + hex.EncodeToString(nonce)
	script := fmt.Sprintf("{\n%s\n} </dev/null 2>&1; echo \"%s $?\"\n%s", cmd, marker, uartFlush)
	deadline := time.Now().Add(timeout)
	g.shell.SetWriteDeadline(deadline)
	if _, err := g.shell.Write([]byte(script)); err != nil {
		g.shellBroken = err
		return "", -1, err
	}
	var buf bytes.Buffer
	chunk := make([]byte, 1<<16)
	want := []byte(marker + " ")
	for {
		// Short reads, and a nudge of newlines whenever the guest is quiet:
		// see uartFlush.
		g.shell.SetReadDeadline(minTime(deadline, time.Now().Add(300*time.Millisecond)))
		n, err := g.shell.Read(chunk)
		buf.Write(chunk[:n])
		if i := bytes.Index(buf.Bytes(), want); i >= 0 {
			rest := buf.Bytes()[i+len(want):]
			if j := bytes.IndexByte(rest, '\n'); j >= 0 {
				status, perr := strconv.Atoi(string(rest[:j]))
				if perr != nil {
					status = -1
				}
				return string(buf.Bytes()[:i]), status, nil
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(deadline) && g.consoleTrouble() == nil {
			if _, werr := g.shell.Write([]byte(uartFlush)); werr == nil {
				continue
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(deadline) {
				err = fmt.Errorf("guest command %q timed out after %v", cmd, timeout)
			} else if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("guest command %q did not finish", cmd)
			}
			if cerr := g.consoleTrouble(); cerr != nil {
				err = fmt.Errorf("%w (%v)", err, cerr)
			}
			g.shellBroken = err
			return buf.String(), -1, err
		}
	}
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// waitForLine polls a file until re matches a line, trouble reports an
// error, or the timeout passes.
func waitForLine(path string, re *regexp.Regexp, timeout time.Duration, trouble func() error) (string, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(path)
		// Only whole lines: the console file may be read half-written,
		// and a match on "release=6.12.117+d" would be a wrong answer.
		b = b[:bytes.LastIndexByte(b, '\n')+1]
		if m := re.Find(b); m != nil {
			return string(m), nil
		}
		if err := trouble(); err != nil {
			return "", err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return "", fmt.Errorf("no line matching %q within %v", re, timeout)
}

func tail(s string, lines int) string {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

func formatUUID(u libvirt.UUID) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

type domainParams struct {
	Name, Type              string
	Metadata                string // the owner marker (owner.go)
	MemoryMiB, VCPUs        int
	Kernel, Initrd          string
	Console, Shell, Cmdline string
}

// The guest's RAM is a shared memfd so hvpatch can map it; no disks, no
// network, no graphics: the initramfs is the whole system.
var domainTemplate = template.Must(template.New("domain").Parse(`<domain type='{{.Type}}'>
  <name>{{.Name}}</name>
  <description>hvpatch test guest (internal/testguest); destroyed by its test process, or by a later test run once that process is gone</description>
  <metadata>{{.Metadata}}</metadata>
  <memory unit='MiB'>{{.MemoryMiB}}</memory>
  <vcpu>{{.VCPUs}}</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{{.Kernel}}</kernel>
    <initrd>{{.Initrd}}</initrd>
    <cmdline>{{.Cmdline}}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{{.Console}}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{{.Shell}}'/><target port='1'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
`))

func domainXML(p domainParams) (string, error) {
	if p.Cmdline == "" {
		p.Cmdline = "console=ttyS0,115200 loglevel=5"
	}
	o, err := me()
	if err != nil {
		return "", fmt.Errorf("testguest: owner marker: %w", err)
	}
	p.Metadata = o.metadata()
	var b bytes.Buffer
	err = domainTemplate.Execute(&b, p)
	return b.String(), err
}
