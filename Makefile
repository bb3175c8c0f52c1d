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

bench:
	@scripts/install-deps.sh bench
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./...

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
