#!/usr/bin/env bash
# make demo: boots a guest, shows /proc/version, applies the return-0 kill
# switch to version_proc_show with bin/hvpatch, shows the empty output,
# reverts, shows it back, and prints the freeze windows. Then it builds a
# real upstream fix (testdata/fixes/unix-siocatmark.diff) with hvpatch build
# for a guest running an older 6.1 build and applies it: the reproducer in
# the guest goes from VULNERABLE to FIXED, and back after the revert.
# HVPATCH_DEMO_SERIES=6.1 picks the other guest kernel (default 6.12).
set -euo pipefail
cd "$(dirname "$0")/.."
HVPATCH_BIN="$PWD/bin/hvpatch" exec go test -count=1 -run '^TestDemo$' -v ./internal/demo
