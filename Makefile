# ambit's build. Every target installs what it needs (scripts/install-deps.sh).
GO      ?= go
PKGS    ?= ./...
GOFLAGS ?=
export GOFLAGS

.PHONY: all build test integration demo bench generate lint deps clean

all: build

deps:
	@scripts/install-deps.sh base

build:
	$(GO) build -o bin/ ./cmd/...

# Unit and in-process tests (real sockets, TLS, HTTP/2) with the race detector.
test: deps
	$(GO) test -race -count=1 -timeout 12m $(PKGS)

# Tests that need root: a real kube-apiserver, network namespaces, eBPF.
integration:
	@scripts/install-deps.sh integration
	$(GO) test -count=1 -timeout 30m -tags integration ./integration/...

# ambit's main job: the local mesh demo on the embedded default (examples/).
demo:
	@echo "make demo will bring up the local mesh: istiod-lite reading examples/, two"
	@echo "network-namespace nodes each with a ztunnel and eBPF capture, a few pods in an"
	@echo "enrolled namespace and one outside it, traffic between them, and a summary of"
	@echo "who talked to whom, with which SPIFFE identities, encrypted or not."
	@echo "It is not built yet (issue: integration)." >&2
	@exit 1

# Go micro-benchmarks of the data-path and control-plane packages, then the
# end-to-end mesh benchmark (root: namespaces, eBPF): direct vs HAProxy mTLS
# pair vs ambit. Writes bench/results/{latest.json,latest.md,*.png,pprof/}.
# BENCHFLAGS go to meshbench (e.g. BENCHFLAGS='-rounds 1'); see bench/README.md.
BENCH_PKGS ?= ./hbone/... ./bpf/... ./istiod-lite/...
BENCHFLAGS ?=
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
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfe[lb]\.go$$')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	$(GO) test -count=1 -run TestEveryPackageHasDocComment .

clean:
	rm -rf bin
