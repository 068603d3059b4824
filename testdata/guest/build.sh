#!/usr/bin/env bash
# Builds the test guests: two Debian cloud kernels (newest 6.1 and 6.12 builds
# in the archive) and one busybox initramfs. Output goes to $OUT (default
# .cache/guest), which is git-ignored. Each step is skipped when its output is
# already there, so a second run costs only the apt-cache look-up.
#
# Layout of $OUT:
#   kernels/<release>/{vmlinuz,config,vmlinux,modules/}   one per series
#   kernels.txt                                          "<series> <release>" lines
#   fix-kernels.txt                                      pinned older builds ("<label> <release>")
#                                                        for the hot-fix acceptance tests; kept
#                                                        apart so loops over kernels.txt skip them
#   initramfs.cpio.gz                                    shared by both kernels
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$(cd "$here/../.." && pwd)/.cache/guest}
mkdir -p "$OUT/kernels" "$OUT/debs"

log() { printf 'guest-build: %s\n' "$*" >&2; }

# newest_package SERIES_REGEX: prints the package name of the newest cloud
# kernel of one series, preferring the -unsigned flavour (same vmlinuz, no
# dependency on the signing template).
newest_package() {
	apt-cache search --names-only "^linux-image-$1" |
		awk '{print $1}' |
		grep -E -- '-cloud-amd64(-unsigned)?$' |
		sed -E 's/-unsigned$//' | sort -uV | tail -n 1
}

ensure_apt_lists() {
	if [ -z "$(apt-cache search --names-only '^linux-image-6\.1\.0-.*-cloud-amd64$' 2>/dev/null | head -n 1)" ]; then
		log "apt lists are empty; running apt-get update"
		apt-get update -qq
	fi
}

fetch_kernel() { # SERIES_LABEL PACKAGE [LIST_FILE]
	local label=$1 pkg=$2 list=${3:-$OUT/kernels.txt.tmp} release dir deb
	release=${pkg#linux-image-}
	dir="$OUT/kernels/$release"
	if [ -s "$dir/vmlinuz" ] && [ -s "$dir/vmlinux" ]; then
		log "$label: $release already built"
	else
		log "$label: downloading $pkg"
		rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/x"
		(cd "$OUT/debs" && { apt-get download -qq "$pkg-unsigned" 2>/dev/null || apt-get download -qq "$pkg"; })
		deb=$(ls -t "$OUT/debs/${pkg}"*.deb | head -n 1)
		dpkg-deb -x "$deb" "$dir.tmp/x"
		cp "$dir.tmp/x/boot/vmlinuz-$release" "$dir.tmp/vmlinuz"
		cp "$dir.tmp/x/boot/config-$release" "$dir.tmp/config"
		# The uncompressed kernel image, for offline symbol work: the bzImage
		# payload is LZ4 (magic 02 21 4c 18) on 6.1, zstd on 6.12.
		extract_vmlinux "$dir.tmp/vmlinuz" "$dir.tmp/vmlinux"
		# Keep a few small modules for module-list tests; drop the rest.
		mkdir -p "$dir.tmp/modules"
		for m in drivers/net/dummy.ko lib/crc-itu-t.ko fs/nls/nls_utf8.ko; do
			for f in "$dir.tmp/x/lib/modules/$release/kernel/$m"*; do
				[ -e "$f" ] || continue
				case "$f" in
				*.xz) xz -dc "$f" >"$dir.tmp/modules/$(basename "${f%.xz}")" ;;
				*.zst) zstd -qdc "$f" >"$dir.tmp/modules/$(basename "${f%.zst}")" ;;
				*) cp "$f" "$dir.tmp/modules/" ;;
				esac
			done
		done
		rm -rf "$dir.tmp/x" "$dir"
		mv "$dir.tmp" "$dir"
		rm -f "$deb"
	fi
	printf '%s %s\n' "$label" "$release" >>"$list"
}

# Pinned older builds for the hot-fix tests (testdata/fixes): the fixes there
# are upstream stable commits between such a build and the newest build of its
# series, and their diffs apply to exactly that build's source:
#   6.1-fix   6.1.0-47            linux-source-6.1 6.1.170-3     testdata/fixes/*.diff
#   6.12-fix  6.12.107+deb12      linux-source-6.12 6.12.107-1~deb12u1  testdata/fixes/6.12/*.diff
# "<label>:<package>" pairs, written to fix-kernels.txt in this order (the
# 6.1 one first; testguest.FixKernel returns the "6.1-fix" one).
FIX_KERNELS=${FIX_KERNELS:-"6.1-fix:linux-image-6.1.0-47-cloud-amd64 6.12-fix:linux-image-6.12.107+deb12-cloud-amd64"}

# fetch_fix_kernels writes fix-kernels.txt. A pinned build that has aged out of
# the archive is reported, not fatal: the other kernels still build, and
# testguest.FixKernel says what is missing.
fetch_fix_kernels() {
	local pair label pkg release rc
	rm -f "$OUT/fix-kernels.txt.tmp"
	touch "$OUT/fix-kernels.txt.tmp"
	for pair in $FIX_KERNELS; do
		label=${pair%%:*} pkg=${pair#*:}
		release=${pkg#linux-image-}
		if [ -s "$OUT/kernels/$release/vmlinuz" ] && [ -s "$OUT/kernels/$release/vmlinux" ]; then
			printf '%s %s\n' "$label" "$release" >>"$OUT/fix-kernels.txt.tmp"
			continue
		fi
		if [ -z "$(apt-cache show "$pkg" 2>/dev/null | head -n 1)" ] &&
			[ -z "$(apt-cache show "$pkg-unsigned" 2>/dev/null | head -n 1)" ]; then
			log "WARNING: pinned fix kernel $pkg ($label) is no longer in the apt archive;"
			log "WARNING: the hot-fix tests cannot run. Pick a served older build of the series (apt-cache madison),"
			log "WARNING: rebase its diffs in testdata/fixes onto that build's linux-source and update FIX_KERNELS in $0"
			continue
		fi
		# A failed download must not stop the build of the other kernels:
		# run it in a subshell that still exits on the first error.
		rm -f "$OUT/fix-kernels.txt.tmp.one"
		set +e
		(set -e; fetch_kernel "$label" "$pkg" "$OUT/fix-kernels.txt.tmp.one")
		rc=$?
		set -e
		if [ "$rc" -eq 0 ]; then
			cat "$OUT/fix-kernels.txt.tmp.one" >>"$OUT/fix-kernels.txt.tmp"
		else
			log "WARNING: fetching pinned fix kernel $pkg ($label) failed; the hot-fix tests cannot run"
			rm -rf "$OUT/kernels/$release.tmp"
		fi
		rm -f "$OUT/fix-kernels.txt.tmp.one"
	done
	mv "$OUT/fix-kernels.txt.tmp" "$OUT/fix-kernels.txt"
}

extract_vmlinux() { # VMLINUZ OUT
	# The bzImage header says where the compressed payload is: setup_sects
	# (byte 0x1f1), payload_offset and payload_length (u32 at 0x248, 0x24c),
	# relative to the protected-mode code after the setup sectors.
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

build_initramfs() {
	local inputs stamp root
	inputs=$(cat "$here/init" "$here"/progs/*.c "$(command -v busybox)" "$OUT"/kernels/*/modules/*.ko 2>/dev/null | sha256sum | cut -c1-16)
	stamp="$OUT/initramfs.stamp"
	if [ -s "$OUT/initramfs.cpio.gz" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
		log "initramfs up to date"
		return
	fi
	log "building initramfs"
	root=$(mktemp -d)
	trap 'rm -rf "$root"' RETURN
	mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,root,etc,lib/modules,usr/bin,usr/sbin}
	cp "$(command -v busybox)" "$root/bin/busybox"
	for applet in $("$root/bin/busybox" --list); do
		[ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
	done
	install -m 0755 "$here/init" "$root/init"
	for c in "$here"/progs/*.c; do
		[ -e "$c" ] || continue
		gcc -static -O2 -o "$root/bin/$(basename "${c%.c}")" "$c"
	done
	# Modules go under their kernel release so /init can pick the right ones.
	for d in "$OUT"/kernels/*/; do
		rel=$(basename "$d")
		mkdir -p "$root/lib/modules/$rel"
		cp "$d"modules/*.ko "$root/lib/modules/$rel/" 2>/dev/null || true
	done
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/initramfs.cpio.gz.tmp"
	mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
	echo "$inputs" >"$stamp"
}

# Test binaries of several packages may build at once: one builder at a time.
exec 9>"$OUT/.build.lock"
flock 9

# KEEP_KERNELS=1 (the test helper sets it) keeps the kernel set kernels.txt
# names while all of it is built, so every package of one test run boots the
# same builds; `make guest` (at the start of make test) picks the newest ones.
kept_kernels() {
	local label release
	[ "${KEEP_KERNELS:-}" = 1 ] && [ -s "$OUT/kernels.txt" ] || return 1
	while read -r label release; do
		[ -s "$OUT/kernels/$release/vmlinuz" ] && [ -s "$OUT/kernels/$release/vmlinux" ] || return 1
	done <"$OUT/kernels.txt"
}

if kept_kernels; then
	log "keeping the kernel set of kernels.txt"
else
	ensure_apt_lists
	rm -f "$OUT/kernels.txt.tmp"
	for pair in '6.1:6\.1\.0-' '6.12:6\.12\.'; do
		label=${pair%%:*} series=${pair#*:}
		pkg=$(newest_package "$series")
		[ -n "$pkg" ] || { log "no cloud-amd64 kernel found for series $label"; exit 1; }
		fetch_kernel "$label" "$pkg"
	done
	mv "$OUT/kernels.txt.tmp" "$OUT/kernels.txt"
fi
fetch_fix_kernels
build_initramfs
log "done: $(tr '\n' ' ' <"$OUT/kernels.txt") fix: $(tr '\n' ' ' <"$OUT/fix-kernels.txt")"
