#!/usr/bin/env bash
# Builds a real kube-apiserver from the Go module proxy and caches it outside the
# repository, keyed by version. Prints the binary's path.
#
#   AMBIT_KUBE_VERSION   Kubernetes version (default v1.36.3)
#   AMBIT_CACHE          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ambit)
set -euo pipefail
ver="${AMBIT_KUBE_VERSION:-v1.36.3}"
cache="${AMBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ambit}"
out="$cache/kube-apiserver-$ver/kube-apiserver"
if [ -x "$out" ]; then echo "$out"; exit 0; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
staging="v0.${ver#v1.}"
cd "$work"
gomod=$(go mod download -json "k8s.io/kubernetes@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -n "$gomod" ] || { echo "build.sh: cannot download k8s.io/kubernetes@$ver" >&2; exit 1; }
{
  echo "module ambit.local/kube-apiserver"
  echo
  echo "go 1.26"
  echo
  echo "require k8s.io/kubernetes $ver"
  # every staging module that k8s.io/kubernetes replaces with ./staging/... is
  # published on the proxy as v0.Y.Z
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#replace \1 => \1 '"$staging"'#p' "$gomod"
} > go.mod
cat > main.go <<'GO'
// Command kube-apiserver is Kubernetes' API server, built from the module proxy.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() { os.Exit(cli.Run(app.NewAPIServerCommand())) }
GO
GOFLAGS=-mod=mod go mod tidy >&2
mkdir -p "$(dirname "$out")"
CGO_ENABLED=0 go build -trimpath -ldflags=-s -o "$out.tmp" . >&2
mv "$out.tmp" "$out"
echo "$out"
