# hvpatch: host-side live patching of Linux guest kernels.
# `make demo` and `make test` install what they need (Debian packages, guest
# kernels, Go modules) and are safe to run again.

GO        ?= go
GUEST_DIR := .cache/guest
BIN       := bin

.PHONY: all build host guest demo test unit vet fmt-check tidy-check staticcheck bench clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

host:
	bash testdata/host-setup.sh

guest: host
	bash testdata/guest/build.sh

# The integration tests boot real guests under libvirt; they are part of the
# normal test run, not an opt-in.
test: guest vet fmt-check tidy-check staticcheck
	$(GO) test -count=1 -timeout 25m ./...
	$(GO) test -count=1 -race -short -timeout 10m ./daemon ./hypervisor
	$(MAKE) --no-print-directory fuzz FUZZTIME=5s

# Fuzz targets (PACKAGE:TARGET) over guest data and operator input: `make
# test` runs each for 5 s, `make fuzz` for FUZZTIME each.
FUZZ := ./patcher:FuzzParsePatch ./symbols:FuzzDecodeKallsyms \
	./introspect:FuzzPageWalk ./introspect:FuzzFieldOf ./introspect:FuzzTaskWalk ./introspect:FuzzModuleWalk \
	./codearea:FuzzDecodeHeader ./codearea:FuzzScanTables ./hypervisor:FuzzParseELFDump ./hypervisor:FuzzParseMonitor
FUZZTIME ?= 60s

.PHONY: fuzz
fuzz:
	@set -e; for t in $(FUZZ); do echo "fuzz $${t#*:} ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$${t#*:}\$$" -fuzztime $(FUZZTIME) $${t%%:*}; done

# Unit tests only: no libvirt, no guests.
unit:
	$(GO) test -count=1 -short ./...

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# go.mod and go.sum as go mod tidy leaves them (prints the difference).
tidy-check:
	$(GO) mod tidy -diff

# A pinned staticcheck from the Go module proxy, built into a cache outside
# the repository.
STATICCHECK_VERSION := v0.8.2
TOOLS_DIR ?= $(HOME)/.cache/hvpatch-tools/staticcheck-$(STATICCHECK_VERSION)
staticcheck:
	@test -x $(TOOLS_DIR)/staticcheck || GOBIN=$(TOOLS_DIR) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(TOOLS_DIR)/staticcheck ./...

demo: guest build
	bash testdata/demo.sh

# The side-by-side report: bench/REPORT.md and bench/REPORT.json. `make test`
# runs the same code in a short mode; the micro-benchmarks of each package
# stay available through `go test -bench`.
bench: guest build
	HVPATCH_BENCH=full $(GO) test -count=1 -timeout 60m -run '^TestReport$$' -v ./bench

clean:
	rm -rf $(BIN) examples/replace/build

# Replacement-function objects (docs/function-replacement.md):
# `make replace-example [REPLACE_KCONFIG=guest-config]`.
include examples/replace/Makefile
