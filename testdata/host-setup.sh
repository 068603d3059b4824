#!/usr/bin/env bash
# Prepares this host for hvpatch's demo and tests: installs the Debian
# packages it needs (once), configures QEMU under libvirt, and starts
# virtlogd and libvirtd when they are not running (there is no systemd here).
# Safe to run again: each step checks first.
set -euo pipefail
log() { printf 'host-setup: %s\n' "$*" >&2; }

# flex, bison, libelf-dev, dwarves (pahole), bc and patch: hvpatch build prepares
# Debian kernel trees (make prepare) and applies source fixes.
packages=(qemu-system-x86 libvirt-daemon-system libvirt-clients busybox-static cpio lz4 zstd xz-utils gcc make flex bison libelf-dev dwarves bc patch)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || { log "need root to install: ${missing[*]}"; exit 1; }
	log "installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU writes serial log files itself (virtlogd would rotate them at 2 MiB),
# and runs as root so it can open /dev/kvm where KVM works.
conf=/etc/libvirt/qemu.conf
changed=0
set_conf() { # KEY VALUE
	if ! grep -qE "^$1 = $2\$" "$conf"; then
		sed -i -E "/^$1 = /d" "$conf"
		echo "$1 = $2" >>"$conf"
		changed=1
	fi
}
set_conf stdio_handler '"file"'
set_conf user '"root"'
set_conf group '"root"'

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! running /run/virtlogd.pid; then
	rm -f /run/virtlogd.pid
	log "starting virtlogd"
	virtlogd -d
fi
if running /run/libvirtd.pid && [ "$changed" = 1 ]; then
	log "restarting libvirtd for the new qemu.conf"
	kill "$(cat /run/libvirtd.pid)"
	for _ in $(seq 50); do running /run/libvirtd.pid || break; sleep 0.1; done
fi
if ! running /run/libvirtd.pid; then
	rm -f /run/libvirtd.pid
	log "starting libvirtd"
	libvirtd -d
fi
for _ in $(seq 100); do
	[ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
	sleep 0.1
done
log "libvirtd did not come up (socket /run/libvirt/libvirt-sock)"
exit 1
