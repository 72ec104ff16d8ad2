# meshless: see README.md. The test, conformance and demo targets need root (network namespaces,
# iptables, tcpdump); deps installs the system packages they use on Debian/Ubuntu.

GO     ?= go
BIN    := bin
# -count=1: never serve a cached result for tests that depend on the kernel and the machine.
# -p 1: one package at a time, so root tests of different packages do not contend for iptables.
GOTEST := $(GO) test -count=1 -p 1 -timeout 30m

.PHONY: all build test conformance demo lint deps clean clean-netns

all: build

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/meshless-cni ./plugin
	CGO_ENABLED=0 $(GO) build -o $(BIN)/meshlessd ./daemon

# The README's test command: lint, unit tests and the conformance suite.
test: deps lint
	$(GOTEST) ./...

conformance: deps
	$(GOTEST) -v ./conformance/

demo: deps
	$(GO) run ./conformance/cmd/demo

lint:
	@unformatted=$$(gofmt -l .); \
	if [ -n "$$unformatted" ]; then echo "gofmt -l reports:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

deps:
	scripts/deps.sh

clean:
	rm -f $(BIN)/meshless-cni $(BIN)/meshlessd

# After an interrupted run (a killed `go test` cannot clean up): remove leftover namespaces.
clean-netns:
	scripts/clean-netns.sh
