#!/usr/bin/env bash
# Builds the extra test guests: the newest cloud-amd64 kernel of the Debian
# series beyond the two of kernels.txt, served by the host's own Debian
# mirror: bullseye 5.10, trixie 6.12 (+deb13) and sid (7.x). They are listed
# in $OUT/extra-kernels.txt ("<label> <release>"), apart from kernels.txt, so
# the tests that loop over testguest.Kernels do not boot them;
# testguest.ExtraKernels returns them.
#
# The host's apt configuration is never changed: a private sources.list, list
# directory and package cache under $OUT/apt are passed to apt-get and
# apt-cache with -o options. Costs for CI: the list update runs at most once
# a day (APT_MAX_AGE seconds), a kernel already built is not downloaded
# again, and each .deb is deleted once the few files needed are extracted.
#
# From 7.x the image package holds the modules but no vmlinuz: that is in
# linux-binary-<release>, at usr/lib/modules/<release>/vmlinuz.
#
# Finally build.sh runs (KEEP_KERNELS=1) so that the shared initramfs gets
# the extra kernels' modules.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$(cd "$here/../.." && pwd)/.cache/guest}
APT_DIR="$OUT/apt"
APT_MAX_AGE=${APT_MAX_AGE:-86400}
# "<label>:<suite>:<package regex after linux-image->"
EXTRA_SERIES=${EXTRA_SERIES:-"5.10:bullseye:5\.10\.0- 6.12-deb13:trixie:6\.12\.[0-9]+\+deb13- 7.x:sid:7\."}

log() { printf 'guest-build-extra: %s\n' "$*" >&2; }

mkdir -p "$OUT/kernels" "$OUT/debs" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"

# The URI of the host's Debian entry (deb822 or one-line format).
host_uri() {
	local f uri=""
	for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' "$f")
		[ -n "$uri" ] && break
	done
	if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
		uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file|ftp):/) {print $i; exit}}' /etc/apt/sources.list)
	fi
	[ -n "$uri" ] || { log "no Debian source entry found in /etc/apt"; return 1; }
	printf '%s\n' "$uri"
}

APT_OPTS=(
	-o "Dir::Etc::SourceList=$APT_DIR/sources.list"
	-o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$APT_DIR/lists"
	-o "Dir::Cache=$APT_DIR/cache"
	-o Debug::NoLocking=1
	-o APT::Get::List-Cleanup=0
)

update_lists() {
	local uri keyring="/usr/share/keyrings/debian-archive-keyring.gpg" opt="" suite want stamp="$APT_DIR/updated"
	uri=$(host_uri)
	[ -r "$keyring" ] && opt=" [signed-by=$keyring]"
	want=""
	for s in $EXTRA_SERIES; do
		suite=$(cut -d: -f2 <<<"$s")
		want+="deb$opt $uri $suite main"$'\n'
	done
	if [ "$(cat "$APT_DIR/sources.list" 2>/dev/null)" != "${want%$'\n'}" ]; then
		printf '%s' "$want" >"$APT_DIR/sources.list"
		rm -f "$stamp"
	fi
	if [ -e "$stamp" ] && [ $(($(date +%s) - $(stat -c %Y "$stamp"))) -lt "$APT_MAX_AGE" ]; then
		return
	fi
	log "updating the private apt lists ($APT_DIR) for: $(cut -d' ' -f4 "$APT_DIR/sources.list" | tr '\n' ' ')"
	apt-get "${APT_OPTS[@]}" -qq update
	touch "$stamp"
}

# newest_package REGEX: the newest cloud-amd64 image package of one series.
newest_package() {
	apt-cache "${APT_OPTS[@]}" search --names-only "^linux-image-$1" |
		awk '{print $1}' |
		grep -E -- '-cloud-amd64(-unsigned)?$' |
		sed -E 's/-unsigned$//' | sort -uV | tail -n 1
}

download() { # PACKAGE...: the first that downloads; prints the .deb path
	local p
	for p in "$@"; do
		rm -f "$OUT/debs/${p}_"*.deb
		if (cd "$OUT/debs" && apt-get "${APT_OPTS[@]}" download -qq "$p" >/dev/null 2>&1); then
			ls -t "$OUT/debs/${p}_"*.deb | head -n 1
			return
		fi
	done
	log "cannot download any of: $*"
	return 1
}

fetch_extra() { # LABEL PACKAGE
	local label=$1 pkg=$2 release dir deb p f
	release=${pkg#linux-image-}
	dir="$OUT/kernels/$release"
	if [ -s "$dir/vmlinuz" ] && [ -s "$dir/vmlinux" ]; then
		log "$label: $release already built"
		printf '%s %s\n' "$label" "$release" >>"$OUT/extra-kernels.txt.tmp"
		return
	fi
	log "$label: downloading $pkg"
	rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/x"
	deb=$(download "$pkg-unsigned" "$pkg")
	extract_from "$deb" "$dir.tmp/x" "$release"
	if [ ! -s "$dir.tmp/x/boot/vmlinuz-$release" ]; then
		# 7.x: the image package is a meta package; the kernel image is in
		# linux-binary-<release>, the modules in linux-modules-<release>,
		# the config in linux-base-<release>, all under usr/lib/modules.
		for p in "linux-binary-$release" "linux-modules-$release" "linux-base-$release"; do
			# shellcheck disable=SC2086
			deb=$(download $p)
			extract_from "$deb" "$dir.tmp/x" "$release"
		done
		f=$(find "$dir.tmp/x" -path "*/modules/$release/vmlinuz" | head -n 1)
		[ -n "$f" ] || { log "$label: no vmlinuz in $pkg nor linux-binary-$release"; return 1; }
		mkdir -p "$dir.tmp/x/boot" && mv "$f" "$dir.tmp/x/boot/vmlinuz-$release"
		f=$(find "$dir.tmp/x" -path "*/modules/$release/config" | head -n 1)
		[ -z "$f" ] || mv "$f" "$dir.tmp/x/boot/config-$release"
	fi
	cp "$dir.tmp/x/boot/vmlinuz-$release" "$dir.tmp/vmlinuz"
	[ -s "$dir.tmp/x/boot/config-$release" ] && cp "$dir.tmp/x/boot/config-$release" "$dir.tmp/config"
	extract_vmlinux "$dir.tmp/vmlinuz" "$dir.tmp/vmlinux"
	mkdir -p "$dir.tmp/modules"
	while IFS= read -r f; do
		case "$f" in
		*.xz) xz -dc "$f" >"$dir.tmp/modules/$(basename "${f%.xz}")" ;;
		*.zst) zstd -qdc "$f" >"$dir.tmp/modules/$(basename "${f%.zst}")" ;;
		*) cp "$f" "$dir.tmp/modules/" ;;
		esac
	done < <(find "$dir.tmp/x" -name '*.ko*')
	rm -rf "$dir.tmp/x" "$dir"
	mv "$dir.tmp" "$dir"
	printf '%s %s\n' "$label" "$release" >>"$OUT/extra-kernels.txt.tmp"
}

# extract_from DEB DIR RELEASE: only what the guests need (kernel image,
# config, the test modules), then the .deb is deleted.
extract_from() {
	dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards --wildcards-match-slash \
		"./boot/vmlinuz-$3" "./boot/config-$3" "*/modules/$3/vmlinuz" "*/modules/$3/config" \
		"*/modules/$3/kernel/drivers/net/dummy.ko*" "*/modules/$3/kernel/*/crc-itu-t.ko*" \
		"*/modules/$3/kernel/fs/nls/nls_utf8.ko*" 2>/dev/null || true
	rm -f "$1"
}

extract_vmlinux() { # VMLINUZ OUT (as in build.sh)
	local setup off len magic
	setup=$(od -An -tu1 -j $((0x1f1)) -N1 "$1" | tr -d ' ')
	off=$(od -An -tu4 -j $((0x248)) -N4 "$1" | tr -d ' ')
	len=$(od -An -tu4 -j $((0x24c)) -N4 "$1" | tr -d ' ')
	off=$(((setup + 1) * 512 + off))
	magic=$(od -An -tx1 -j "$off" -N4 "$1" | tr -d ' ')
	case "$magic" in
	02214c18) tail -c +"$((off + 1))" "$1" | head -c "$len" | lz4 -dc 2>/dev/null >"$2" || true ;;
	28b52ffd) tail -c +"$((off + 1))" "$1" | head -c "$len" | zstd -qdc 2>/dev/null >"$2" || true ;;
	fd377a58) tail -c +"$((off + 1))" "$1" | head -c "$len" | xz -qdc 2>/dev/null >"$2" || true ;;
	1f8b*) tail -c +"$((off + 1))" "$1" | head -c "$len" | gzip -qdc 2>/dev/null >"$2" || true ;;
	*) log "unknown payload compression in $1 (magic $magic)"; return 1 ;;
	esac
	[ "$(head -c 4 "$2" | od -An -tx1 | tr -d ' ')" = "7f454c46" ] || { log "payload of $1 is not an ELF"; return 1; }
}

# One builder at a time (shared with build.sh's lock file would deadlock
# when build.sh runs below, so a lock of its own).
exec 8>"$OUT/.build-extra.lock"
flock 8

# KEEP_KERNELS=1: keep the set extra-kernels.txt names while it is built.
kept() {
	local label release
	[ "${KEEP_KERNELS:-}" = 1 ] && [ -s "$OUT/extra-kernels.txt" ] || return 1
	while read -r label release; do
		[ -s "$OUT/kernels/$release/vmlinuz" ] && [ -s "$OUT/kernels/$release/vmlinux" ] || return 1
	done <"$OUT/extra-kernels.txt"
}

if kept; then
	log "keeping the kernel set of extra-kernels.txt"
else
	update_lists
	rm -f "$OUT/extra-kernels.txt.tmp"
	touch "$OUT/extra-kernels.txt.tmp"
	for s in $EXTRA_SERIES; do
		label=$(cut -d: -f1 <<<"$s") re=$(cut -d: -f3 <<<"$s")
		pkg=$(newest_package "$re")
		if [ -z "$pkg" ]; then
			log "WARNING: no cloud-amd64 kernel found for series $label"
			continue
		fi
		set +e
		(set -e; fetch_extra "$label" "$pkg")
		rc=$?
		set -e
		[ "$rc" -eq 0 ] || { log "WARNING: building $label ($pkg) failed"; rm -rf "$OUT/kernels/${pkg#linux-image-}.tmp"; }
	done
	mv "$OUT/extra-kernels.txt.tmp" "$OUT/extra-kernels.txt"
fi
# The initramfs carries every built kernel's modules.
KEEP_KERNELS=1 OUT="$OUT" bash "$here/build.sh"
log "done: $(tr '\n' ' ' <"$OUT/extra-kernels.txt")"
