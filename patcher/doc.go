// Package patcher changes the code of a running guest kernel from the host:
// it parses patch files, plans every edit against guest memory, writes the
// edits while the guest is frozen, and keeps a journal per domain so that
// patches can be reverted and checked against what the guest really holds.
//
// # Safety model
//
// Plan first, outside any freeze (MakePlan): match the kernel (release glob,
// GNU build id read from the kernel's in-memory notes), resolve symbols,
// compare the bytes in memory with the patch's expected bytes, decode the
// function from its start to find instruction boundaries, and build the new
// bytes. Nothing is written if any edit of a patch fails to plan.
//
// Then, inside one freeze (CodeWriter.Stop ... Resume): re-read every range
// and compare it with the planned original bytes, write all edits, read them
// back. On any mismatch, write error or panic, the bytes already written
// are restored before the guest runs again; Resume runs on every path.
//
// An edit that replaces exactly one whole instruction with bytes of the
// same length is safe without knowing where the vCPUs are: a frozen vCPU
// stops at an instruction boundary, so it is either before the instruction
// or past it. Other bytes edits need the RIP-checked mode: the VM is stopped
// the way the monitor stops it (libvirt suspend or the gdbstub, not a ptrace
// freeze, during which the monitor must not be called), every vCPU's RIP is
// read, and the write is refused while any lies strictly inside the
// instructions the edit touches. Not covered by that check: a return address
// or an interrupted frame inside the range on some task's stack (a task
// preempted in the middle of those instructions). Such edits are for
// straight-line code that nothing can be preempted in; prefer whole-
// instruction edits.
//
// # Return edits
//
// A return edit writes a 5-byte sequence over the fentry NOP
// (0f 1f 44 00 00) at the function's entry, after endbr64 on IBT kernels:
// "xor %eax,%eax; ret; int3; int3" for 0, "push $v; pop %rax; ret; int3" for
// -128..127, "ret" and int3 padding for void. The NOP is one instruction, so
// this is a whole-instruction edit. If the site holds anything else (a call
// to an ftrace trampoline while tracing, a kprobe or a BPF trampoline is
// attached; a jmp of a livepatch or a direct call) the edit is refused with
// what was found. The ret does not go through __x86_return_thunk; see
// ReturnSequence for why that is accepted. The site stays ftrace's: while a
// return edit is applied, enabling tracing of that function makes the guest
// WARN in ftrace_verify_code (seen on the 6.1 guest) and ftrace's bug
// handling then turns ftrace off until reboot. Revert before tracing.
//
// # Replace edits
//
// A replace edit (replace.go) links an ELF object against the guest's
// kallsyms into the code area (package codearea) and writes "jmp rel32" to
// the replacement over the same fentry NOP. The replace edits of a patch
// that name one object share one code-area entry ("<patch id>:<object file
// name>"), linked once; each jump leads to its own with symbol in it. An
// objects map in the patch pins each object's SHA-256, checked before
// linking. Planning links it and refuses
// unresolved symbols, unsupported relocations, oversized sections and a
// taken site. The apply installs and verifies all the code, then writes all
// the jumps, in one freeze; a failure undoes both. The revert removes every
// jump in one freeze, then releases the code in later stops once no vCPU RIP or live
// kernel stack points into it (bounded by ReleaseWait; a patch whose code
// stays busy is kept in state "releasing" and a later revert retries).
// Reconcile reports a jump without its code-area entry and the reverse.
//
// # Journal and boot identity
//
// Each domain has <state>/<uuid>.json, written atomically (temporary file,
// fsync, rename, fsync of the directory) before the guest is written
// ("pending") and after ("applied"). A boot identity (BootIdentity: the
// release, the KASLR address of _text and the randomised page_offset_base,
// vmalloc_base and vmemmap_base) tells whether the guest rebooted since.
// Every operation starts by reconciling the journal with guest memory and
// reports what differed (rebooted, reverted behind hvpatch's back, a
// pending apply that did complete, bytes nobody expected).
//
// One operation at a time per domain: an in-process guard, an flock on the
// host-wide /run/hvpatch/locks/<uuid>.lock (DefaultLockDir, whatever the
// state directory) and one on <state>/<uuid>.lock, so the CLI (with any
// --state-dir) and the daemon exclude each other; other domains proceed in
// parallel.
//
// # Activeness check and cumulative patches
//
// A patch with consistency: stack (consistency.go) is switched only in a
// stop where no vCPU executes, and no live kernel stack returns into, a
// function it changes at its entry or the code of a patch it supersedes;
// otherwise the guest resumes untouched and the apply retries with
// back-off, then is refused naming the tasks. A patch that lists applied
// patches in replaces: supersedes them in its one stop (supersede.go); a
// function another applied patch changed is refused otherwise.
package patcher
