#!/usr/bin/env bash
# Builds Istio's echo server and client (istio.io/istio/pkg/test/echo: what
# the Gateway API conformance image registry.k8s.io/gateway-api/echo-advanced
# runs, and what the mesh conformance tests exec as `client`) from the Go
# module proxy and caches them outside the repository, keyed by version.
# Prints the directory that holds `server` and `client`, and the image's
# /cert.crt and /cert.key (a self-signed pair: the conformance manifests
# start the server with --crt=/cert.crt --key=/cert.key), laid out as the
# image's root for kubelet.Kubelet's Images (a directory) and Entrypoints
# ("server").
#
#   AMBIT_ISTIO_VERSION  istio.io/istio module version (a pseudo-version:
#                        Istio's tags are not semantic import versions)
#   AMBIT_CACHE          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ambit)
#
# Safe to run concurrently, like build.sh: one build per cache at a time
# (flock), each binary renamed into place whole. Tests never run this.
set -euo pipefail
ver="${AMBIT_ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
cache="${AMBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ambit}"
dir="$cache/istio-echo-$ver"

done_() { [ -x "$dir/server" ] && [ -x "$dir/client" ] && [ -s "$dir/cert.crt" ] && [ -s "$dir/cert.key" ]; }
if done_; then echo "$dir"; exit 0; fi

certs() {
	[ -s "$dir/cert.crt" ] && [ -s "$dir/cert.key" ] && return 0
	local t
	t=$(mktemp -d "$dir/certs.XXXXXX")
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
		-subj /CN=echo -addext subjectAltName=DNS:echo,DNS:localhost \
		-keyout "$t/cert.key" -out "$t/cert.crt" 2>/dev/null
	mv -f "$t/cert.key" "$dir/cert.key"
	mv -f "$t/cert.crt" "$dir/cert.crt"
	rmdir "$t"
}

mkdir -p "$cache"
exec 9>"$cache/.build-echo.lock"
if ! flock -n 9; then
	echo "build-echo.sh: another build holds $cache/.build-echo.lock; waiting" >&2
	flock 9
fi
if done_; then echo "$dir"; exit 0; fi
if [ -x "$dir/server" ] && [ -x "$dir/client" ]; then
	certs
	echo "$dir"
	exit 0
fi

work=$(mktemp -d)
tmp=""
trap 'rm -rf "$work" ${tmp:+"$tmp"}' EXIT
cd "$work"
echo "build-echo.sh: building Istio's echo server and client ($ver) from the Go module proxy" >&2
start=$(date +%s)
cat >go.mod <<EOF
module ambit.local/echo

go 1.26

require istio.io/istio $ver
EOF
cat >tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "istio.io/istio/pkg/test/echo/cmd/client"
	_ "istio.io/istio/pkg/test/echo/cmd/server"
)
EOF
GOFLAGS=-mod=mod go mod tidy >&2
mkdir -p "$dir"
for c in server client; do
	tmp=$(mktemp "$dir/$c.XXXXXX")
	CGO_ENABLED=0 go build -trimpath -ldflags=-s -o "$tmp" "istio.io/istio/pkg/test/echo/cmd/$c" >&2
	chmod 0755 "$tmp"
	mv -f "$tmp" "$dir/$c"
	tmp=""
done
certs
echo "build-echo.sh: built in $(($(date +%s) - start)) s" >&2
echo "$dir"
