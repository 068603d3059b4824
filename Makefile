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
test: guest k8s-tools vet fmt-check tidy-check staticcheck
	$(GO) test -count=1 -timeout 25m ./...
	$(GO) test -count=1 -race -short -timeout 10m ./daemon ./hypervisor
	$(MAKE) --no-print-directory fuzz FUZZTIME=20000x

# Fuzz targets (PACKAGE:TARGET) over guest data and operator input: `make
# test` runs each for 20,000 inputs, `make fuzz` for FUZZTIME each. The test
# run counts inputs rather than seconds: on a loaded host Go's fuzzing can
# report its own time limit as a failure ("context deadline exceeded").
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

# kube-apiserver and etcd for the fleet tests (fleet/, internal/kubetest),
# built from the Go module proxy in their own module (tools/k8s, never in
# hvpatch's go.mod) into a cache outside the repository; skipped when both
# binaries are there (cold: ~13 min and 3-4 GB of build cache on 2 cores).
K8S_VERSION := v1.37.2
K8S_TOOLS_DIR ?= $(HOME)/.cache/hvpatch-tools/k8s-$(K8S_VERSION)
export KUBEBUILDER_ASSETS ?= $(K8S_TOOLS_DIR)
.PHONY: k8s-tools
k8s-tools:
	@K8S_TOOLS_DIR=$(K8S_TOOLS_DIR) bash tools/k8s/build.sh

demo: guest build
	bash testdata/demo.sh

# The side-by-side report: bench/REPORT.md and bench/REPORT.json. `make test`
# runs the same code in a short mode; the micro-benchmarks of each package
# stay available through `go test -bench`.
bench: guest build
	HVPATCH_BENCH=full $(GO) test -count=1 -timeout 60m -run '^TestReport$$' -v ./bench

clean:
	rm -rf $(BIN) examples/replace/build

# `make install [PREFIX=/usr/local] [DESTDIR=staging]`: the binaries, the
# systemd unit (paths rewritten for PREFIX), the default configuration
# (never over an existing one), bash/zsh/fish completions and man pages
# generated from the commands, the docs. `make uninstall` removes all but
# the configuration.
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(PREFIX)/lib/systemd/system
MANDIR      ?= $(PREFIX)/share/man
DOCDIR      ?= $(PREFIX)/share/doc/hvpatch
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
INSTALL     ?= install
GEN         := $(BIN)/gen
# Man page dates from the last commit, so that the pages are reproducible.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)

.PHONY: install uninstall gen-docs
gen-docs:
	$(GO) build -o $(BIN)/ ./cmd/hvpatch ./cmd/hvpatchd
	rm -rf $(GEN) && mkdir -p $(GEN)/man $(GEN)/completions
	env -u HVPATCH_DAEMON_SOCKET SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(BIN)/hvpatch gendocs --man $(GEN)/man
	env SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(BIN)/hvpatchd --gen-man $(GEN)/man
	$(BIN)/hvpatch completion bash > $(GEN)/completions/hvpatch.bash
	$(BIN)/hvpatch completion zsh > $(GEN)/completions/_hvpatch
	$(BIN)/hvpatch completion fish > $(GEN)/completions/hvpatch.fish
	sed -e 's|/usr/local/bin/hvpatchd|$(BINDIR)/hvpatchd|' \
		-e 's|/etc/hvpatch/|$(SYSCONFDIR)/hvpatch/|g' \
		-e 's|file:///usr/share/doc/hvpatch/|file://$(DOCDIR)/|' \
		configs/hvpatchd.service > $(GEN)/hvpatchd.service

install: gen-docs
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR) \
		$(DESTDIR)$(DOCDIR)/patches $(DESTDIR)$(DOCDIR)/examples/python $(DESTDIR)$(SYSCONFDIR)/hvpatch/patches
	$(INSTALL) -m 0755 $(BIN)/hvpatch $(BIN)/hvpatchd $(DESTDIR)$(BINDIR)/
	$(INSTALL) -m 0644 $(GEN)/hvpatchd.service $(DESTDIR)$(UNITDIR)/hvpatchd.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/hvpatch/hvpatchd.yaml ]; then \
		echo "keeping $(DESTDIR)$(SYSCONFDIR)/hvpatch/hvpatchd.yaml (the defaults are in $(DOCDIR)/hvpatchd.yaml)"; \
	else \
		echo "$(INSTALL) -m 0644 configs/hvpatchd.yaml $(DESTDIR)$(SYSCONFDIR)/hvpatch/hvpatchd.yaml"; \
		$(INSTALL) -m 0644 configs/hvpatchd.yaml $(DESTDIR)$(SYSCONFDIR)/hvpatch/hvpatchd.yaml; \
	fi
	$(INSTALL) -m 0644 $(GEN)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	$(INSTALL) -m 0644 $(GEN)/man/*.8 $(DESTDIR)$(MANDIR)/man8/
	$(INSTALL) -m 0644 $(GEN)/completions/hvpatch.bash $(DESTDIR)$(BASHCOMPDIR)/hvpatch
	$(INSTALL) -m 0644 $(GEN)/completions/_hvpatch $(DESTDIR)$(ZSHCOMPDIR)/_hvpatch
	$(INSTALL) -m 0644 $(GEN)/completions/hvpatch.fish $(DESTDIR)$(FISHCOMPDIR)/hvpatch.fish
	$(INSTALL) -m 0644 README.md configs/hvpatchd.yaml docs/*.md docs/openapi.json $(DESTDIR)$(DOCDIR)/
	$(INSTALL) -m 0644 configs/patches/* $(DESTDIR)$(DOCDIR)/patches/
	$(INSTALL) -m 0644 examples/python/hvpatch_api.py $(DESTDIR)$(DOCDIR)/examples/python/

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/hvpatch $(DESTDIR)$(BINDIR)/hvpatchd $(DESTDIR)$(UNITDIR)/hvpatchd.service \
		$(DESTDIR)$(MANDIR)/man1/hvpatch.1 $(DESTDIR)$(MANDIR)/man1/hvpatch-*.1 $(DESTDIR)$(MANDIR)/man8/hvpatchd.8 \
		$(DESTDIR)$(BASHCOMPDIR)/hvpatch $(DESTDIR)$(ZSHCOMPDIR)/_hvpatch $(DESTDIR)$(FISHCOMPDIR)/hvpatch.fish
	rm -rf $(DESTDIR)$(DOCDIR)

# Replacement-function objects (docs/function-replacement.md):
# `make replace-example [REPLACE_KCONFIG=guest-config]`.
include examples/replace/Makefile
