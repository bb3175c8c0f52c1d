#!/usr/bin/env bash
# Builds the Gateway API conformance suite's test binary
# (sigs.k8s.io/gateway-api/conformance, the version of go.mod's
# sigs.k8s.io/gateway-api) from the Go module proxy and caches it outside the
# repository, keyed by version. Prints the binary's path. The binary runs the
# upstream suite unchanged (TestConformance) against the cluster of
# $KUBECONFIG, with the suite's own flags.
#
#   AMBIT_GATEWAY_API_VERSION  default: sigs.k8s.io/gateway-api's version in go.mod
#   AMBIT_CACHE                cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ambit)
#
# Safe to run concurrently, like build.sh. Tests never run this.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
ver="${AMBIT_GATEWAY_API_VERSION:-$(sed -n 's#^\s*sigs.k8s.io/gateway-api \(v[^ ]*\).*#\1#p' "$here/go.mod" | head -1)}"
[ -n "$ver" ] || { echo "build-conformance.sh: no sigs.k8s.io/gateway-api version" >&2; exit 1; }
cache="${AMBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ambit}"
out="$cache/gateway-api-conformance-$ver/conformance.test"
if [ -x "$out" ]; then echo "$out"; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/.build-conformance.lock"
if ! flock -n 9; then
	echo "build-conformance.sh: another build holds the lock; waiting" >&2
	flock 9
fi
if [ -x "$out" ]; then echo "$out"; exit 0; fi
work=$(mktemp -d)
tmp=""
trap 'rm -rf "$work" ${tmp:+"$tmp"}' EXIT
cd "$work"
echo "build-conformance.sh: building the Gateway API conformance suite $ver from the Go module proxy" >&2
start=$(date +%s)
cat >go.mod <<GOMOD
module ambit.local/conformance

go 1.26

require (
	sigs.k8s.io/gateway-api $ver
	sigs.k8s.io/gateway-api/conformance $ver
)
GOMOD
cat >tools.go <<'GO'
//go:build tools

package tools

import _ "sigs.k8s.io/gateway-api/conformance"
GO
GOFLAGS=-mod=mod go mod tidy >&2
# the suite's own test package, as a binary
GOFLAGS=-mod=mod go get sigs.k8s.io/gateway-api/conformance@$ver >&2
mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
GOFLAGS=-mod=mod CGO_ENABLED=0 go test -c -trimpath -o "$tmp" sigs.k8s.io/gateway-api/conformance >&2
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
tmp=""
echo "build-conformance.sh: built in $(($(date +%s) - start)) s" >&2
echo "$out"
