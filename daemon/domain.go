package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/introspect"
	"github.com/hvpatch/hvpatch/patcher"
	"github.com/hvpatch/hvpatch/service"
)

// opTimeout bounds one operation on a domain (open, apply, revert).
const opTimeout = 2 * time.Minute

// systemRunning is SYSTEM_RUNNING of the kernel's enum system_states when
// the guest's BTF does not say: init is running, boot-time code patching
// (alternatives, ftrace's NOPs, static keys, initmem freeing) is over.
// Patching earlier would race with the kernel's own code changes. The
// value moved: 2 before SYSTEM_FREEING_INITMEM was added (5.10), 3 since.
const systemRunning = 3

// Patch states of a declared patch on a domain.
const (
	statePending = "pending" // waiting for the domain or its kernel
	stateApplied = "applied"
	stateRefused = "refused" // cannot change until the file or the boot does
	stateFailing = "failing" // retried with backoff
	// stateWaiting: the patch is for a module the guest has not loaded
	// (reason "waiting for module NAME"); applied when it appears.
	stateWaiting = "waiting"
)

// modulePoll is how often a domain with declared patches on modules reads
// the guest's module signal (introspect.Kernel.ModuleSignal: 24 bytes of
// guest memory) to notice a module load or unload without waiting for the
// reconcile interval.
var modulePoll = 100 * time.Millisecond

// patchState is what the daemon knows of one declared patch on one domain.
type patchState struct {
	file, hash, id string
	keyID          string
	state          string
	reason         string
	failures       int
	nextTry        time.Time
	refusedBoot    string
	since          time.Time
}

// domain is one libvirt domain and its worker goroutine. mu serialises
// every operation on it: reconcile passes and API requests.
//
// Lock order: d.mu and dom.mu are never held together. The daemon copies
// what it needs out of d.mu before touching a domain, and a domain updates
// the daemon's gauge after releasing dom.mu.
type domain struct {
	d    *Daemon
	uuid string
	name atomic.Pointer[string] // libvirt may rename a domain: read with Name()

	kickc    chan struct{}
	force    atomic.Bool
	quit     chan struct{}
	stopOnce sync.Once
	sum      atomic.Value // summary for the gauge

	mu      sync.Mutex
	hv      *hypervisor.Domain
	live    *patcher.Live
	pid     int
	bootID  string
	running bool // the kernel reached SYSTEM_RUNNING
	waitFor time.Duration
	// kernelUp is when the current boot's kernel was first seen running.
	kernelUp time.Time
	patches  map[string]*patchState // by file
	panics   int                    // consecutive panics caught, for the backoff

	// watchModules is set while a declared patch names a module: the
	// worker then polls the module signal every modulePoll.
	watchModules atomic.Bool
	// modSig is the module signal last read (haveSig: since the kernel
	// was attached); modChanged when the poll saw it change last.
	modSig     introspect.ModuleSignal
	haveSig    bool
	modChanged time.Time
}

func newDomain(d *Daemon, name, uuid string) *domain {
	dom := &domain{d: d, uuid: uuid, kickc: make(chan struct{}, 1), quit: make(chan struct{}), patches: map[string]*patchState{}}
	dom.setName(name)
	dom.sum.Store("unpatched")
	return dom
}

// Name is the domain's libvirt name as last seen.
func (dom *domain) Name() string { return *dom.name.Load() }

func (dom *domain) setName(name string) { dom.name.Store(&name) }

func (dom *domain) summary() string { return dom.sum.Load().(string) }

// kick asks for a reconcile pass now; force also ignores backoff (a new
// boot or a restarted domain deserves a fresh try).
func (dom *domain) kick(force bool) {
	if force {
		dom.force.Store(true)
	}
	select {
	case dom.kickc <- struct{}{}:
	default:
	}
}

func (dom *domain) stop() { dom.stopOnce.Do(func() { close(dom.quit) }) }

func (dom *domain) run() {
	timer := time.NewTimer(0)
	defer timer.Stop()
	poll := time.NewTicker(modulePoll)
	defer poll.Stop()
	for {
		select {
		case <-dom.quit:
			return
		case <-dom.kickc:
		case <-timer.C:
		case <-poll.C:
			if !dom.watchModules.Load() || !dom.safePollModules() {
				continue
			}
		}
		next := dom.safePass(dom.force.Swap(false))
		timer.Stop()
		select {
		case <-timer.C:
		default:
		}
		timer.Reset(next)
	}
}

// close releases the guest memory mapping.
func (dom *domain) close() {
	dom.mu.Lock()
	defer dom.mu.Unlock()
	dom.dropLive()
}

func (dom *domain) dropLive() {
	if dom.live != nil {
		dom.live.Close()
	}
	dom.live, dom.running, dom.bootID, dom.pid = nil, false, "", 0
	dom.haveSig = false
}

// safePollModules reads the guest's module signal and reports whether it
// changed since the last read (a module may have gone live or away): the
// caller runs a pass then. It never waits for an operation in progress
// (that one reads the module list itself), and a panic on guest data is
// contained (no pass).
func (dom *domain) safePollModules() (changed bool) {
	isolate(func() error {
		if !dom.mu.TryLock() {
			return nil
		}
		defer dom.mu.Unlock()
		if dom.live == nil || !dom.running {
			return nil
		}
		sig, err := dom.live.Kernel.ModuleSignal()
		if err != nil {
			return nil
		}
		if dom.haveSig && sig != dom.modSig {
			changed, dom.modChanged = true, time.Now()
		}
		dom.modSig, dom.haveSig = sig, true
		return nil
	})
	return changed
}

// readModuleSignal records the module signal before a pass looks at the
// module list, so that a load after this read is seen by the next poll.
func (dom *domain) readModuleSignal() {
	if dom.live == nil {
		return
	}
	if sig, err := dom.live.Kernel.ModuleSignal(); err == nil {
		dom.modSig, dom.haveSig = sig, true
	}
}

// forget drops a domain that libvirt no longer knows: its memory mapping,
// journal and lock file (its UUID will not come back).
func (dom *domain) forget() {
	dom.close()
	st := dom.d.pt.State
	lock, err := st.Lock(dom.Name(), dom.uuid)
	if err != nil {
		return
	}
	defer lock.Unlock()
	os.Remove(filepath.Join(st.Dir, dom.uuid+".json"))
	os.Remove(filepath.Join(st.Dir, dom.uuid+".lock"))
}

func (dom *domain) opContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(dom.d.opCtx, opTimeout)
}

// errNotRunning says the domain cannot be patched now.
type errNotRunning struct{ state string }

func (e errNotRunning) Error() string { return "domain is " + e.state }

// ensureLive opens (or checks) the domain's kernel; mu is held. With
// forPatch the domain must run and its kernel have finished booting.
func (dom *domain) ensureLive(ctx context.Context, forPatch bool) error {
	if dom.hv == nil {
		hv, err := dom.d.conn.LookupDomain(ctx, dom.uuid)
		if err != nil {
			return err
		}
		dom.hv = hv
	}
	st, err := dom.hv.State(ctx)
	if err != nil {
		return err
	}
	if st != "running" && (forPatch || st != "paused") {
		dom.dropLive()
		return errNotRunning{st}
	}
	if dom.live != nil {
		changed, err := dom.changed(ctx)
		if err != nil {
			return err // the monitor failed us: the next pass looks again
		}
		if changed != "" {
			dom.d.log.Info("guest rebooted: kernel changed", "domain", dom.Name(), "why", changed)
			dom.dropLive()
		}
	}
	if dom.live == nil {
		pid, err := dom.hv.QEMUPid(ctx)
		if err != nil {
			return err
		}
		writer := dom.d.cfg.Writer
		if writer == "auto" {
			writer = ""
		}
		t0 := time.Now()
		live, err := patcher.OpenLiveCached(ctx, dom.hv, writer, dom.d.kernels)
		if err != nil {
			return fmt.Errorf("kernel not found (yet): %w", err)
		}
		live.Writer = markWriter(live.Writer, dom.d.cfg.StateDir, dom.uuid)
		id, err := patcher.BootIdentity(live.Target)
		if err != nil {
			live.Close()
			return err
		}
		dom.live, dom.pid, dom.bootID, dom.running = live, pid, id, false
		dom.d.log.Info("guest attached", "domain", dom.Name(), "release", live.Kernel.Release,
			"attach", time.Since(t0).Round(time.Microsecond), "kernel_open", live.Kernel.AttachTime.Round(time.Microsecond))
	}
	if !dom.running {
		dom.running = kernelRunning(dom.live.Kernel)
		if dom.running {
			dom.kernelUp = time.Now()
			dom.d.log.Info("guest kernel up", "domain", dom.Name(), "release", dom.live.Kernel.Release, "boot_id", dom.bootID)
		}
	}
	if forPatch && !dom.running {
		return errors.New("guest kernel still booting")
	}
	return nil
}

func kernelRunning(k *introspect.Kernel) bool {
	addr, err := k.SymbolAddr("system_state")
	if err != nil {
		return true // cannot tell: assume a kernel found whole is up
	}
	want := int64(systemRunning)
	if v, err := introspect.EnumValue(k.BTF, "system_states", "SYSTEM_RUNNING"); err == nil {
		want = v
	}
	var b [4]byte
	if k.AS.ReadVirt(addr, b[:]) != nil {
		return false
	}
	return int64(uint32(b[0])|uint32(b[1])<<8|uint32(b[2])<<16|uint32(b[3])<<24) == want
}

// changed says why the cached kernel is no longer the one the guest runs
// ("" while it is). The cached page walk cannot tell (after a reset the old
// kernel's memory is still there, untouched), so the kernel image is looked
// up again through the page tables a vCPU uses now, and the boot identity
// is read. A monitor that does not answer is an error, not a reboot: right
// after a gdbstub session it was seen to fail a query, and dropping the
// kernel then cost a re-attach and the module signal.
func (dom *domain) changed(ctx context.Context) (string, error) {
	pid, err := dom.hv.QEMUPid(ctx)
	if err != nil {
		return "", fmt.Errorf("domain %s: QEMU pid: %w", dom.Name(), err)
	}
	if pid != dom.pid {
		return fmt.Sprintf("QEMU pid %d, was %d", pid, dom.pid), nil
	}
	cpus, err := dom.hv.CPUs(ctx)
	if err != nil {
		return "", fmt.Errorf("domain %s: vCPU registers: %w", dom.Name(), err)
	}
	k := dom.live.Kernel
	ok := false
	for i, c := range cpus {
		if c.CR0&(1<<31) == 0 || c.EFER&(1<<10) == 0 { // paging off, or not in long mode: firmware or early boot
			continue
		}
		// Bit 12 of CR3 selects PTI's user copy of the PGD, or is part of
		// the PGD's address when PTI is off (a 7.x guest on this CPU
		// model): both readings are tried, as the attach does.
		var tr introspect.Translation
		for _, root := range []uint64{introspect.KernelCR3(c.CR3), c.CR3} {
			as := introspect.NewAddressSpace(dom.live.Mem, root, c.CR4&hypervisor.CR4LA57 != 0)
			if tr, err = as.Translate(k.TextStart); err == nil {
				break
			}
		}
		if err != nil {
			return fmt.Sprintf("vCPU %d (CR3 %#x) does not map the kernel text at %#x: %v", i, c.CR3, k.TextStart, err), nil
		}
		if tr.GPA != k.PhysBase {
			return fmt.Sprintf("vCPU %d (CR3 %#x) maps the kernel text at gpa %#x, was %#x", i, c.CR3, tr.GPA, k.PhysBase), nil
		}
		ok = true
	}
	if !ok {
		return "no vCPU has paging on in long mode", nil
	}
	id, err := patcher.BootIdentity(dom.live.Target)
	if err != nil {
		return fmt.Sprintf("boot identity: %v", err), nil
	}
	if id != dom.bootID {
		return fmt.Sprintf("boot identity %s, was %s", id, dom.bootID), nil
	}
	return "", nil
}

// withLive runs f with the domain's kernel, one operation at a time. A
// panic while opening the guest or in f fails this request and marks the
// domain failed; it never reaches the caller.
func (dom *domain) withLive(forPatch bool, f func(ctx context.Context, live *patcher.Live) error) error {
	err := isolate(func() error {
		dom.mu.Lock()
		defer dom.mu.Unlock()
		ctx, cancel := dom.opContext()
		defer cancel()
		if err := dom.ensure(ctx, forPatch); err != nil {
			var nr errNotRunning
			if errors.As(err, &nr) {
				return fmt.Errorf("domain %s is %s", dom.Name(), nr.state)
			}
			return fmt.Errorf("domain %s: %w", dom.Name(), err)
		}
		return f(ctx, dom.live)
	})
	var gp *guestPanic
	if errors.As(err, &gp) {
		dom.failed("api", gp)
		return fmt.Errorf("domain %s: %w", dom.Name(), gp)
	}
	return err
}

// ensure is ensureLive, or the daemon's test hook in its place.
func (dom *domain) ensure(ctx context.Context, forPatch bool) error {
	if h := dom.d.ensureHook; h != nil {
		return h(dom, ctx, forPatch)
	}
	return dom.ensureLive(ctx, forPatch)
}

// pass is one reconcile pass; it returns when the next one is due. The
// gauge is updated after dom.mu is released (see the lock order).
func (dom *domain) pass(force bool) time.Duration {
	decl := dom.d.declaredFor(dom.Name(), dom.uuid)
	next := dom.passLocked(force, decl)
	dom.d.updateGauge()
	return next
}

func (dom *domain) passLocked(force bool, decl []*Declared) time.Duration {
	interval := dom.d.cfg.Reconcile.Interval
	dom.mu.Lock()
	defer dom.mu.Unlock()
	// Forget patches no longer declared (they stay applied: removing a file
	// is not a revert; hvpatch revert is).
	keep := map[string]bool{}
	for _, c := range decl {
		keep[c.File] = true
	}
	for f := range dom.patches {
		if !keep[f] {
			delete(dom.patches, f)
		}
	}
	if len(decl) == 0 {
		// Nothing declared: do not touch the guest at all.
		dom.watchModules.Store(false)
		dom.sum.Store("unpatched")
		return interval
	}
	for _, c := range decl {
		ps := dom.patches[c.File]
		if ps == nil || ps.hash != c.Hash {
			ps = &patchState{file: c.File, hash: c.Hash, id: c.Patch.ID, keyID: c.KeyID, state: statePending, since: time.Now()}
			dom.patches[c.File] = ps
		}
	}
	ctx, cancel := dom.opContext()
	defer cancel()
	if err := dom.ensure(ctx, true); err != nil {
		reason := err.Error()
		var nr errNotRunning
		wait := interval
		if !errors.As(err, &nr) {
			// Booting (or libvirt trouble): look again soon, then less often.
			dom.waitFor = min(max(2*dom.waitFor, 250*time.Millisecond), 2*time.Second, interval)
			wait = dom.waitFor
		}
		for _, ps := range dom.patches {
			if ps.state != stateRefused || ps.refusedBoot != dom.bootID {
				ps.state, ps.reason = statePending, reason
			}
		}
		dom.sum.Store("pending")
		return wait
	}
	dom.waitFor, dom.panics = 0, 0
	next := interval
	buildID, _ := patcher.BuildID(dom.live.Target)
	watch := false
	for _, c := range decl {
		watch = watch || len(c.Patch.Modules()) > 0
	}
	dom.watchModules.Store(watch)
	if watch {
		dom.readModuleSignal()
		dom.releaseModuleGone(ctx)
	}
	for _, c := range decl {
		ps := dom.patches[c.File]
		if ps.state == stateRefused && ps.refusedBoot == dom.bootID {
			continue
		}
		if !force && ps.state == stateFailing && time.Now().Before(ps.nextTry) {
			next = min(next, time.Until(ps.nextTry))
			continue
		}
		if why := kernelMismatch(c.Patch, dom.live.Kernel.Release, buildID); why != "" {
			dom.refuse(ps, why, "kernel_mismatch")
			continue
		}
		if waiting, soon := dom.waitModules(c, ps); waiting {
			if soon {
				next = min(next, modulePoll)
			}
			dom.applyKernelPart(ctx, c, ps)
			continue
		}
		dom.apply(ctx, c, ps)
		if ps.state == stateFailing {
			next = min(next, time.Until(ps.nextTry))
		}
	}
	sum := "patched"
	for _, ps := range dom.patches {
		switch ps.state {
		case stateFailing, stateRefused:
			sum = "failing"
		case statePending:
			if sum == "patched" || sum == "waiting" {
				sum = "pending"
			}
		case stateWaiting:
			if sum == "patched" {
				sum = "waiting"
			}
		}
	}
	dom.sum.Store(sum)
	return max(next, 50*time.Millisecond)
}

// waitModules puts a declared patch whose modules are not all loaded (and
// live) in the guest in state waiting; it reports whether it did, and
// soon when one of them is loading (look again after modulePoll: the
// module signal does not change when its init ends). A patch that was
// applied is then on a module that went away: its journal entry is module
// gone (releaseModuleGone).
func (dom *domain) waitModules(c *Declared, ps *patchState) (waiting, soon bool) {
	if len(c.Patch.Modules()) == 0 {
		return false, false
	}
	missing, settling, err := patcher.MissingModules(dom.live.Target, c.Patch)
	if err != nil || len(missing) == 0 {
		return false, false // an unreadable module list: the apply reports it
	}
	why := "waiting for module " + strings.Join(missing, ", ")
	if was, _, _ := strings.Cut(ps.reason, ";"); ps.state != stateWaiting || was != why {
		if ps.state == stateApplied {
			dom.d.metrics.ModuleEvents.WithLabelValues("gone").Inc()
			dom.d.log.Info("patched module unloaded: declared patch waits for it again", "domain", dom.Name(), "patch", ps.id, "file", ps.file, "modules", missing)
		} else {
			dom.d.log.Info("declared patch waits for its module", "domain", dom.Name(), "patch", ps.id, "file", ps.file, "modules", missing)
		}
		ps.since = time.Now()
	}
	if ps.state != stateWaiting || !strings.HasPrefix(ps.reason, why+";") {
		ps.reason = why
	}
	ps.state, ps.failures = stateWaiting, 0
	return true, settling
}

// applyKernelPart applies the kernel image edits of a declared patch that
// waits for a module: patcher.Apply puts them in alone (and answers a no-op
// once they are), so the kernel is fixed before the module loads, as
// livepatch patches vmlinux at once. The reason says how it went.
func (dom *domain) applyKernelPart(ctx context.Context, c *Declared, ps *patchState) {
	if _, err := c.Patch.KernelPart(); err != nil {
		return // nothing to apply before the module: the patch waits whole
	}
	why, _, _ := strings.Cut(ps.reason, ";")
	res, err := dom.d.pt.Apply(ctx, dom.live.Domain, c.Patch, patcher.ApplyOptions{})
	switch {
	case errors.Is(err, patcher.ErrBusy):
		return // the CLI holds the domain: next pass
	case err != nil:
		reason := why + "; its kernel edits could not be applied: " + err.Error()
		if ps.reason != reason {
			dom.d.log.Warn("kernel edits of a patch waiting for its module failed", "domain", dom.Name(), "patch", ps.id, "file", ps.file, "err", err)
			dom.d.metrics.Applies.WithLabelValues("failed").Inc()
		}
		ps.reason = reason
		return
	}
	if res.Freeze.Method != "" {
		dom.d.metrics.ObserveFreeze(res.Freeze.Method, res.Freeze.Window)
	}
	if !res.NoOp {
		dom.d.metrics.Applies.WithLabelValues("applied").Inc()
		dom.d.log.Info("kernel edits of a patch waiting for its module applied", "domain", dom.Name(), "patch", ps.id, "file", ps.file,
			"freeze_window", res.Freeze.Window, "method", res.Freeze.Method, "message", res.Message)
	}
	ps.reason = why + "; its kernel edits are applied"
}

// releaseModuleGone marks journaled patches of unloaded modules module
// gone and releases their code-area entries once unused; failures (code
// still in use) are logged and retried at the next pass.
func (dom *domain) releaseModuleGone(ctx context.Context) {
	rep, err := dom.d.pt.ReleaseModuleGone(ctx, dom.live.Domain)
	if rep != nil && rep.Status != nil {
		for _, ps := range rep.Status.Differences() {
			if ps.Memory == patcher.MemModuleGone {
				dom.d.log.Info("journal: module gone", "domain", dom.Name(), "patch", ps.Entry.ID, "difference", ps.Difference)
			}
		}
	}
	if rep != nil && len(rep.Released) > 0 {
		dom.d.log.Info("code of an unloaded module's patch released", "domain", dom.Name(), "entries", rep.Released, "waits", rep.Waits)
	}
	if err != nil && !errors.Is(err, patcher.ErrBusy) {
		dom.d.log.Warn("releasing the code of an unloaded module's patch", "domain", dom.Name(), "err", err)
	}
}

func (dom *domain) refuse(ps *patchState, why, reason string) {
	if ps.state != stateRefused || ps.reason != why {
		dom.d.log.Warn("declared patch refused on this boot", "domain", dom.Name(), "patch", ps.id, "file", ps.file, "reason", why)
		dom.d.metrics.Applies.WithLabelValues("refused").Inc()
		dom.d.metrics.Failures.WithLabelValues(reason).Inc()
	}
	ps.state, ps.reason, ps.refusedBoot, ps.since = stateRefused, why, dom.bootID, time.Now()
}

// apply applies one declared patch; mu is held and the kernel is up.
func (dom *domain) apply(ctx context.Context, c *Declared, ps *patchState) {
	res, err := dom.d.pt.Apply(ctx, dom.live.Domain, c.Patch, patcher.ApplyOptions{})
	if res != nil && res.Freeze.Method != "" {
		dom.d.metrics.ObserveFreeze(res.Freeze.Method, res.Freeze.Window)
	}
	if errors.Is(err, patcher.ErrBusy) {
		// Someone else (the CLI) is patching this domain: not a failure.
		ps.nextTry = time.Now().Add(time.Second)
		return
	}
	if err != nil {
		ps.failures++
		backoff := dom.d.cfg.Reconcile.Interval << min(ps.failures-1, 20)
		ps.nextTry = time.Now().Add(min(backoff, dom.d.cfg.Reconcile.MaxBackoff))
		ps.state, ps.reason = stateFailing, err.Error()
		dom.d.metrics.Applies.WithLabelValues("failed").Inc()
		dom.d.metrics.Failures.WithLabelValues("apply").Inc()
		dom.d.log.Warn("declared patch failed", "domain", dom.Name(), "patch", ps.id, "file", ps.file,
			"failures", ps.failures, "retry_at", ps.nextTry.Format(time.RFC3339), "err", err)
		return
	}
	was := ps.state
	ps.state, ps.reason, ps.failures = stateApplied, "", 0
	if res.NoOp {
		if was != stateApplied {
			ps.since = time.Now()
			dom.d.metrics.Applies.WithLabelValues("already_applied").Inc()
			dom.d.log.Info("declared patch already applied", "domain", dom.Name(), "patch", ps.id, "message", res.Message)
		}
		return
	}
	late := ""
	if was == stateWaiting {
		late = "module appeared"
		dom.d.metrics.ModuleEvents.WithLabelValues("appeared").Inc()
		if !dom.modChanged.IsZero() {
			dom.d.metrics.LateApply.Observe(time.Since(dom.modChanged).Seconds())
		}
	}
	ps.since = time.Now()
	dom.d.metrics.Applies.WithLabelValues("applied").Inc()
	for _, r := range res.Reconciled {
		dom.d.log.Info("journal reconciled", "domain", dom.Name(), "patch", r.Entry.ID, "difference", r.Difference)
	}
	args := []any{"domain", dom.Name(), "patch", ps.id, "file", ps.file,
		"freeze_window", res.Freeze.Window, "method", res.Freeze.Method,
		"since_kernel_up", time.Since(dom.kernelUp).Round(time.Millisecond)}
	if late != "" {
		args = append(args, "late", late, "since_module_signal", time.Since(dom.modChanged).Round(time.Microsecond))
	}
	dom.d.log.Info("declared patch applied", args...)
}

// kernelMismatch says why a patch's match section excludes the kernel,
// "" when it fits: a refusal that holds for the whole boot.
func kernelMismatch(p *patcher.Patch, release, buildID string) string {
	if len(p.Match.Release) > 0 {
		ok := false
		for _, g := range p.Match.Release {
			if m, _ := path.Match(g, release); m {
				ok = true
			}
		}
		if !ok {
			return fmt.Sprintf("patch %s is for kernel release %s, the guest runs %s", p.ID, strings.Join(p.Match.Release, " or "), release)
		}
	}
	if len(p.Match.BuildIDs) > 0 {
		for _, id := range p.Match.BuildIDs {
			if id == buildID {
				return ""
			}
		}
		return fmt.Sprintf("patch %s is for kernel build id %s, the guest kernel %s has %q", p.ID, strings.Join(p.Match.BuildIDs, " or "), release, buildID)
	}
	return ""
}

// declared reports the declared patches' states for the status endpoint.
func (dom *domain) declared() []service.Declared {
	var out []service.Declared
	for _, ps := range dom.patches {
		d := service.Declared{File: ps.file, ID: ps.id, State: ps.state, Reason: ps.reason, KeyID: ps.keyID, Since: ps.since}
		if ps.state == stateFailing {
			d.NextTry = ps.nextTry
		}
		out = append(out, d)
	}
	return out
}
