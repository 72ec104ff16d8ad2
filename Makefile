# meshless: see README.md. The test, conformance and demo targets need root (network namespaces,
# iptables, tcpdump); deps installs the system packages they use on Debian/Ubuntu.

GO      ?= go
BIN     := bin
# Where the conformance report (report.md, report.json) is written.
RESULTS ?= results/conformance
# -count=1: never serve a cached result for tests that depend on the kernel and the machine.
# -p 1: one package at a time, so root tests of different packages do not contend for iptables.
GOTEST  := $(GO) test -count=1 -p 1 -timeout 30m
# The Kubernetes release whose kube-apiserver the tests run against (pkg/kube, conformance/kubeapi);
# scripts/k8s-binaries.sh builds it once into a cache directory keyed by version.
KUBERNETES_VERSION ?= v1.34.4
export MESHLESS_KUBERNETES_BIN ?= $(or $(MESHLESS_CACHE),/var/cache/meshless)/kubernetes-$(KUBERNETES_VERSION)

# The conformance suite is piped into its report tool: a failure on either side of the pipe
# must fail the target.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

# `make bench`: the benchmark of issue 6 (bench/cmd/bench). BENCH_FLAGS=-quick for a short run.
BENCH_RESULTS ?= results/bench
BENCH_FLAGS   ?=
# The version of hey (github.com/rakyll/hey) that scripts/bench-deps.sh builds into its cache.
HEY_VERSION   ?= v0.1.5

.PHONY: all build image manifests test race conformance e2e-k8s e2e-k8s-deps demo bench bench-deps lint deps spire-binaries kube-binaries clean clean-netns

all: build

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/meshless-cni ./plugin
	CGO_ENABLED=0 $(GO) build -o $(BIN)/meshlessd ./daemon

# The meshless/meshlessd:dev image without Docker: a docker-archive tarball of the static binaries
# plus this machine's iptables (meshlessd runs iptables-*-save and iptables-*-restore in its
# container), for `ctr -n k8s.io images import` on local clusters. hack/image copies iptables
# with its links, shared libraries and extensions; without iptables on this machine the image
# holds the static binaries only (the Dockerfile's `static` target).
IMAGE_TAG ?= meshless/meshlessd:dev
IMAGE_IPTABLES := $(filter-out %-apply,$(wildcard /usr/sbin/iptables* /usr/sbin/ip6tables* \
	/usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/lib/*/xtables))
image: build
	$(if $(IMAGE_IPTABLES),,@echo "image: iptables not found on this machine; the image has no iptables")
	$(GO) run ./hack/image -out $(BIN)/meshless-image.tar -tag $(IMAGE_TAG) \
		-entrypoint /usr/local/bin/meshlessd \
		-file $(BIN)/meshlessd=/usr/local/bin/meshlessd -file $(BIN)/meshless-cni=/usr/local/bin/meshless-cni \
		$(addprefix -host ,$(IMAGE_IPTABLES))

# Offline validation of install/: kubectl kustomize renders it (when kubectl is installed), and
# install's Go test decodes every object strictly into its k8s.io/api type and checks the DaemonSet.
manifests:
	@if command -v kubectl >/dev/null; then kubectl kustomize install/ >/dev/null && echo "kubectl kustomize install/: ok"; \
	else echo "kubectl not found: install/ is checked by its Go test only"; fi
	$(GO) test -count=1 ./install ./hack/image

# The README's test command: lint, unit tests, the race detector's pass, the conformance suite
# with its report, then meshless on a real one-node Kubernetes (e2e-k8s).
test: deps bench-deps spire-binaries kube-binaries lint
	$(GOTEST) $$($(GO) list ./... | grep -v '/conformance$$')
	$(MAKE) race
	$(run-conformance)
	$(MAKE) e2e-k8s

# The unit tests of the packages whose goroutines share state (the data path, the daemon's pods
# and enrollment API, the TLS configs and session caches, the Kubernetes, SPIRE and conflist
# watchers, the capture's parallel install) again under the race detector, which needs cgo. The
# plugin's own tests are left out: they start the plugin as a process of its own for every CNI
# call, and an instrumented process takes about a second to start (their pass alone took 127 s).
RACE_PKGS := ./pkg/tunnel ./pkg/agent ./pkg/tls ./pkg/kube ./pkg/spire ./pkg/cniconf \
	./pkg/capture ./pkg/enroll ./pkg/enrollhttp ./pkg/adopt ./daemon
race: spire-binaries kube-binaries
	scripts/deps.sh gcc libc6-dev
	CGO_ENABLED=1 $(GOTEST) -race $(RACE_PKGS)

# The conformance suite alone; its output is the `go test -v` log, and a report lands in $(RESULTS).
conformance: deps kube-binaries
	$(run-conformance)

define run-conformance
$(GO) build -o $(BIN)/conformance-report ./conformance/cmd/report
$(GOTEST) -json ./conformance/ | $(BIN)/conformance-report -out $(RESULTS)
endef

# meshless on a real one-node Kubernetes on this machine, offline: containerd, etcd, the control
# plane, kubelet and kube-proxy (built once per version, like kube-apiserver) in a network
# namespace of their own, `kubectl apply -k install/`, workloads, and the checks of issue 5
# (see e2e/k8s). It moves /etc/cni/net.d, /opt/cni/bin and meshlessd's host dirs aside while it
# runs and restores them after, also after a crash (on the next run). The report, the logs and
# the captures are kept in results/e2e-k8s/.
E2E_IMAGES := $(BIN)/e2e-pause.tar $(BIN)/e2e-workload.tar
e2e-k8s: e2e-k8s-deps image
	scripts/k8s-binaries.sh $(KUBERNETES_VERSION) kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy >/dev/null
	CGO_ENABLED=0 $(GO) build -o $(BIN)/e2e-pause ./e2e/k8s/pause
	CGO_ENABLED=0 $(GO) build -o $(BIN)/meshless-testapp ./conformance/cmd/meshless-testapp
	$(GO) run ./hack/image -out $(BIN)/e2e-pause.tar -tag meshless-e2e/pause:dev -entrypoint /pause \
		-file $(BIN)/e2e-pause=/pause
	$(GO) run ./hack/image -out $(BIN)/e2e-workload.tar -tag meshless-e2e/workload:dev \
		-file /bin/busybox=/bin/busybox -file $(BIN)/meshless-testapp=/usr/local/bin/meshless-testapp
	$(GO) build -o $(BIN)/e2e-k8s ./e2e/k8s
	$(BIN)/e2e-k8s -kubernetes-bin $(MESHLESS_KUBERNETES_BIN) -meshless-image $(BIN)/meshless-image.tar \
		-pause-image $(BIN)/e2e-pause.tar -workload-image $(BIN)/e2e-workload.tar -repo .

# The system packages of e2e-k8s, besides deps': a container runtime, the reference CNI plugins
# (the primary CNI) and a static busybox for the workload image.
e2e-k8s-deps:
	scripts/deps.sh containerd runc containernetworking-plugins busybox-static

demo: deps
	$(GO) run ./conformance/cmd/demo

# Medians of interleaved runs of plaintext, meshless, stunnel4 and haproxy, then meshless alone;
# prints the table and writes $(BENCH_RESULTS)/bench.json and bench.md. About 12 minutes, or 3
# with BENCH_FLAGS=-quick.
bench:
	@hey=$$(scripts/bench-deps.sh $(HEY_VERSION)) && \
	$(GO) build -o $(BIN)/bench ./bench/cmd/bench && \
	$(BIN)/bench -hey "$$hey" -out $(BENCH_RESULTS) $(BENCH_FLAGS)

# stunnel4, haproxy, iperf3, wrk, nginx (apt) and hey (built once per version into the cache).
bench-deps:
	scripts/bench-deps.sh $(HEY_VERSION) >/dev/null

lint:
	@unformatted=$$(gofmt -l .); \
	if [ -n "$$unformatted" ]; then echo "gofmt -l reports:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

deps:
	scripts/deps.sh

# spire-server and spire-agent for pkg/spire's tests, built once per version into a cache directory.
spire-binaries:
	scripts/spire-binaries.sh

# kube-apiserver for the tests against a real API server, built once per version (cold: minutes).
kube-binaries:
	scripts/k8s-binaries.sh $(KUBERNETES_VERSION) kube-apiserver >/dev/null

clean:
	rm -f $(BIN)/meshless-cni $(BIN)/meshlessd $(BIN)/conformance-report $(BIN)/meshless-image.tar $(BIN)/bench \
		$(BIN)/e2e-k8s $(BIN)/e2e-pause $(BIN)/meshless-testapp $(E2E_IMAGES)

# After an interrupted run (a killed `go test` cannot clean up): remove leftover namespaces.
clean-netns:
	scripts/clean-netns.sh
