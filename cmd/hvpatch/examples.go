package main

// examples are the Examples sections of the commands, by command path, for
// the commands whose file does not set its own (newRoot fills them in, and
// a test checks that every command has one).
var examples = map[string]string{
	"hvpatch": `  hvpatch domains                       # running guests, like virsh list
  hvpatch -c qemu:///system info web01   # the guest kernel: release, KASLR, phys_base
  hvpatch read web01 version_proc_show 64 --disasm
  hvpatch apply web01 fix.yaml --dry-run
  hvpatch --version`,
	"hvpatch domains": `  hvpatch domains                 # active domains, running first by id, like virsh list
  hvpatch domains --all           # inactive ones too, like virsh list --all
  hvpatch -c qemu+unix:///system?socket=/run/libvirt/virtqemud-sock domains
  LIBVIRT_DEFAULT_URI=qemu:///session hvpatch domains --json`,
	"hvpatch info": `  hvpatch info web01
  hvpatch info 0f3c7a52-8c7e-4d3e-9d7a-2a1d3b4c5e6f --json
  hvpatch info --dump web01.core   # a dump written by virsh dump --memory-only`,
	"hvpatch sym": `  hvpatch sym web01 seq_printf              # every symbol of the name
  hvpatch sym web01 0xffffffff8134c2a5      # the symbol holding an address, and its aliases
  hvpatch sym --dump web01.core version_proc_show --json`,
	"hvpatch syms": `  hvpatch syms web01 > kallsyms             # like the guest's /proc/kallsyms
  hvpatch syms web01 --grep '^version_proc_'`,
	"hvpatch read": `  hvpatch read web01 version_proc_show 64 --disasm   # like crash's dis
  hvpatch read web01 linux_banner+0x10 48
  hvpatch read web01 0xffffffff82000000 16
  hvpatch read --dump web01.core init_task 32 --json`,
	"hvpatch ps": `  hvpatch ps web01
  hvpatch ps --dump web01.core --json`,
	"hvpatch lsmod": `  hvpatch lsmod web01
  hvpatch lsmod web01 --json`,
	"hvpatch btf": `  hvpatch btf web01 --format c > vmlinux.h        # every type, like bpftool btf dump format c
  hvpatch btf web01 --type uts_namespace --type seq_file --type seq_printf > guest.h
  hvpatch btf --dump web01.core --format c -o vmlinux.h`,
	"hvpatch mem": `  hvpatch mem read web01 --phys 0x1000000 64`,
	"hvpatch mem read": `  hvpatch mem read web01 --phys 0x1000000 64
  hvpatch mem read --dump web01.core --phys 0x1000 256
  hvpatch mem read --dump ram.img --raw-base 0 --phys 0x9f000 16 --json`,
	"hvpatch apply": `  hvpatch apply web01 fix.yaml --dry-run      # the plan: addresses, expected bytes
  hvpatch apply web01 fix.yaml
  hvpatch apply web01 fix.yaml --writer gdbstub --state-dir /tmp/hvpatch-state`,
	"hvpatch revert": `  hvpatch status web01                # the applied patches and their ids
  hvpatch revert web01 cve-2026-1234`,
	"hvpatch status": `  hvpatch status web01
  hvpatch status web01 --json`,
	"hvpatch keygen": `  hvpatch keygen ops --dir /etc/hvpatch/keys   # ops.key (keep it private) and ops.pub`,
	"hvpatch sign": `  hvpatch sign --key /etc/hvpatch/keys/ops.key fix.yaml   # writes fix.yaml.sig
  hvpatch sign --key ops.key bundles/*/*.yaml`,
}
