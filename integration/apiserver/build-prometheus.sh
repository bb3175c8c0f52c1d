#!/usr/bin/env bash
# Builds Prometheus from the Go module proxy with Kubernetes service discovery
# (Debian's prometheus package is built without it: "field
# kubernetes_sd_configs not found") and caches it outside the repository,
# keyed by version. Prints the binary's path. Only the kubernetes SD plugin
# is compiled in (Prometheus' build tags remove_all_sd,enable_kubernetes_sd),
# without the web UI's assets (the HTTP API is all the tests use).
#
#   AMBIT_PROMETHEUS_VERSION   module version (default v0.316.0: Prometheus 3.16)
#   AMBIT_CACHE                cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ambit)
#
# Safe to run concurrently (flock; the binary is renamed into place). Tests
# never run this: `make tools` does, before them.
set -euo pipefail
ver="${AMBIT_PROMETHEUS_VERSION:-v0.316.0}"
cache="${AMBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ambit}"
out="$cache/prometheus-$ver/prometheus"

if [ -x "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.build-prometheus.lock"
if ! flock -n 9; then
	echo "build-prometheus.sh: another build holds the lock; waiting" >&2
	flock 9
fi
if [ -x "$out" ]; then echo "$out"; exit 0; fi

start=$(date +%s)
echo "build-prometheus.sh: building Prometheus $ver (kubernetes SD) from the Go module proxy (minutes on a cold cache)" >&2
dir=$(go mod download -json "github.com/prometheus/prometheus@$ver" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
[ -n "$dir" ] || { echo "build-prometheus.sh: cannot download github.com/prometheus/prometheus@$ver" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -rf "$work" "$tmp"' EXIT
# A writable copy (the module cache is read-only), outside any workspace.
cp -r "$dir"/. "$work"
chmod -R u+w "$work"
(cd "$work" && CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod go build -trimpath -ldflags=-s \
	-tags remove_all_sd,enable_kubernetes_sd -o "$tmp" ./cmd/prometheus) >&2
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
echo "build-prometheus.sh: built in $(($(date +%s) - start)) s" >&2
echo "$out"
