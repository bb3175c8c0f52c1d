# ambit's build. Every target installs what it needs (scripts/install-deps.sh).
GO      ?= go
PKGS    ?= ./...
# The Go micro-benchmarks make bench runs (bench/README.md).
BENCH_PKGS ?= ./hbone/... ./bpf/... ./istiod-lite/... ./authz/... ./ztunnel/...
GOFLAGS ?=
export GOFLAGS

.PHONY: all build test integration demo bench generate lint deps tools clean images conformance

all: build

deps:
	@scripts/install-deps.sh base

# Long builds the tests use (kube-apiserver, kube-controller-manager,
# kube-scheduler, Istio's echo server and client for the Gateway API
# conformance echo image, and Prometheus with Kubernetes service discovery,
# from the module proxy, minutes when cold), once,
# under a lock, into ${AMBIT_CACHE:-~/.cache/ambit}, before any test runs:
# never inside a test's timeout.
tools: deps
	@nice -n 10 integration/apiserver/build.sh kube-apiserver kube-controller-manager kube-scheduler >/dev/null
	@nice -n 10 integration/apiserver/build-echo.sh >/dev/null
	@nice -n 10 integration/spire/build.sh >/dev/null
	@nice -n 10 integration/apiserver/build-prometheus.sh >/dev/null

# How every shipped binary is built (the same in ambitctl/images, bench/ and
# integration/mesh: what is measured is what ships): static, CGO_ENABLED=0
# (nothing in ambit needs cgo; a static binary maps no libc or ld.so), and
# gRPC without golang.org/x/net/trace (grpcnotrace: its html/template makes
# the linker keep every exported method of every reachable type, about 5 MB
# of ztunnel's text and read-only data and 3 MB of its RSS; issue 18).
BUILD_TAGS ?= grpcnotrace

build:
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(BUILD_TAGS) -o bin/ ./cmd/...

# OCI images of istiod-lite, ztunnel and waypoint, without a Docker engine
# (go-containerregistry, as ko): bin/images/NAME/ (OCI layout) and
# bin/images/NAME.tar (docker load). IMAGE_HUB and IMAGE_TAG are what
# `ambitctl install --hub --tag` then takes (ambitctl/images).
IMAGE_HUB ?= ghcr.io/ambit-mesh
IMAGE_TAG ?= latest
images:
	$(GO) run ./cmd/ambit-images -out bin/images -hub $(IMAGE_HUB) -tag $(IMAGE_TAG)

# Unit and in-process tests (real sockets, TLS, HTTP/2) with the race detector.
test: deps tools
	$(GO) test -race -count=1 -timeout 12m $(PKGS)
	$(GO) test -count=1 -timeout 10m -run '^TestImage' ./ambitctl/

# Tests that need root: a real kube-apiserver, network namespaces, eBPF.
integration: tools
	@scripts/install-deps.sh integration
	$(GO) test -count=1 -timeout 40m -tags integration -v -run . ./integration/

# ambit's main job: the local mesh demo on the embedded default (examples/).
# The upstream Gateway API conformance suite, profiles MESH-HTTP and
# MESH-GRPC, against ambit on the harness cluster
# (integration/cluster_conformance_test.go); their reports:
# conformance/report-mesh-http.yaml, conformance/report-mesh-grpc.yaml, and
# every test's line in conformance/results-mesh-{http,grpc}.txt.
# CONFORMANCE_PROFILES=MESH-GRPC runs one of them.
conformance: tools
	@scripts/install-deps.sh integration
	@nice -n 10 integration/apiserver/build-conformance.sh >/dev/null
	AMBIT_CONFORMANCE_SUITE=$$(integration/apiserver/build-conformance.sh) AMBIT_CONFORMANCE_PROFILES=$(CONFORMANCE_PROFILES) \
		$(GO) test -count=1 -timeout 60m -tags integration,conformance -v -run '^TestConformance$$' ./integration/

demo:
	@scripts/install-deps.sh base
	$(GO) run ./integration/demo $(DEMOFLAGS)

bench:
	@scripts/install-deps.sh bench
	@mkdir -p bench/results
	@echo "go test -bench $(BENCH_PKGS) > bench/results/microbench.txt"
	@$(GO) test -run '^$$' -bench . -benchmem -count 1 -timeout 10m $(BENCH_PKGS) > bench/results/microbench.txt 2>&1 \
		|| echo "FAIL: go test -bench exited with status $$?" >> bench/results/microbench.txt
	@grep -E '^(Benchmark|ok|FAIL|pkg:)' bench/results/microbench.txt || true
	$(GO) run ./bench/cmd/meshbench -out bench/results -microbench bench/results/microbench.txt $(BENCHFLAGS)

generate:
	@scripts/install-deps.sh generate
	$(GO) generate ./...

lint:
	$(GO) mod tidy -diff
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfe[lb]\.go$$')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags integration ./integration/
	$(GO) tool staticcheck ./...
	$(GO) test -count=1 -run TestEveryPackageHasDocComment .
	@! $(GO) list -deps ./cmd/ztunnel | grep -E '^k8s.io/(client-go|api/|apimachinery)' || { echo "cmd/ztunnel must not link Kubernetes client libraries (memory per node)"; exit 1; }
	@! CGO_ENABLED=0 $(GO) list -tags $(BUILD_TAGS) -deps ./cmd/ztunnel ./cmd/waypoint | grep -E '^(text/template|runtime/cgo)$$' || { echo "cmd/ztunnel and cmd/waypoint as built must not link text/template (it turns off the linker's dead-method elimination) or cgo (memory per node)"; exit 1; }
	@! $(GO) list -deps ./model ./identity | grep -E '^(crypto/x509|github.com/ambit-mesh/ambit/(certs|istiod-lite))' || { echo "model and identity must not link X.509 or the CA (names only: package identity)"; exit 1; }
	@$(MAKE) --no-print-directory generate
	@git diff --exit-code --stat -- bpf api || { echo "generated code is stale: run make generate and commit"; exit 1; }

clean:
	rm -rf bin
