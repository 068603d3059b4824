#!/usr/bin/env bash
# make demo: boots a real test guest and shows it running. Later stages of the
# project extend this to applying and reverting a patch.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go test -count=1 -run 'TestBootEachKernel' -v ./internal/testguest
