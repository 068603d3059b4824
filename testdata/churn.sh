#!/usr/bin/env bash
# Churns unrelated VMs beside the test suite: in a loop, starts tiny
# transient domains, pauses and resumes them, and destroys them, so that the
# tests meet a host whose domain list and domain states keep changing (as on
# a real hypervisor host). Run it in the background during `make test`:
#
#   bash testdata/churn.sh &   ...   kill %1
#
# Its domains are named hvpchurn-<pid>-<n>, carry a description saying so,
# and are QEMU with 64 MiB, one vCPU, no disk and no kernel (the firmware
# finds nothing to boot and idles). It touches no other domain, and destroys
# all of its own when it exits (end of CHURN_SECONDS, SIGINT, SIGTERM, or an
# error).
#
# Settings (environment):
#   CHURN_URI      libvirt URI               (default qemu:///system)
#   CHURN_MAX      domains alive at once     (default 3)
#   CHURN_SECONDS  stop after this long; 0 runs until killed (default 0)
#   CHURN_SEED     seed of the random choices (default: the pid)
set -euo pipefail

uri=${CHURN_URI:-qemu:///system}
max=${CHURN_MAX:-3}
seconds=${CHURN_SECONDS:-0}
RANDOM=${CHURN_SEED:-$$}
prefix="hvpchurn-$$-"
log() { printf 'churn: %s\n' "$*" >&2; }
v() { virsh -q -c "$uri" "$@"; }

command -v virsh >/dev/null || { log "virsh not found (testdata/host-setup.sh installs libvirt-clients)"; exit 1; }
v version >/dev/null || { log "libvirtd does not answer at $uri"; exit 1; }

mine=() # names of the live domains this script created

cleanup() {
	trap - EXIT INT TERM
	local name
	# Every domain with this run's prefix, whether or not it is in the list
	# (a create that timed out may still have started one).
	for name in $(v list --all --name 2>/dev/null | grep -- "^$prefix" || true); do
		v destroy "$name" >/dev/null 2>&1 || true
	done
	log "stopped; destroyed this run's domains ($prefix*)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

n=0
create() {
	n=$((n + 1))
	local name="$prefix$n" xml
	xml=$(mktemp)
	cat >"$xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <description>testdata/churn.sh (pid $$): unrelated VM churned beside the test suite; destroyed when the script exits</description>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices><memballoon model='none'/></devices>
</domain>
EOF
	if v create "$xml" >/dev/null; then
		mine+=("$name")
		log "started $name"
	else
		log "could not start $name"
	fi
	rm -f "$xml"
}

pick() { echo "${mine[$((RANDOM % ${#mine[@]}))]}"; }

destroy_one() {
	local i=$((RANDOM % ${#mine[@]}))
	local name=${mine[$i]}
	v destroy "$name" >/dev/null 2>&1 || true
	mine=("${mine[@]:0:$i}" "${mine[@]:$((i + 1))}")
	log "destroyed $name"
}

start=$SECONDS
while [ "$seconds" = 0 ] || [ $((SECONDS - start)) -lt "$seconds" ]; do
	case $((RANDOM % 4)) in
	0 | 1)
		if [ ${#mine[@]} -lt "$max" ]; then create; elif [ ${#mine[@]} -gt 0 ]; then destroy_one; fi
		;;
	2)
		if [ ${#mine[@]} -gt 0 ]; then
			name=$(pick)
			v suspend "$name" >/dev/null 2>&1 && log "paused $name" || true
			sleep "0.$((RANDOM % 10))"
			v resume "$name" >/dev/null 2>&1 && log "resumed $name" || true
		fi
		;;
	3)
		if [ ${#mine[@]} -gt 0 ]; then destroy_one; fi
		;;
	esac
	sleep "$((RANDOM % 2)).$((RANDOM % 10))"
done
