#!/usr/bin/env bash
# Builds Kubernetes control-plane binaries from the Go module proxy and caches
# them outside the repository, keyed by version. Prints each binary's path.
#
#   build.sh [component...]   default: kube-apiserver
#                             (kube-apiserver kube-controller-manager kube-scheduler)
#
#   AMBIT_KUBE_VERSION   Kubernetes version (default v1.36.3)
#   AMBIT_CACHE          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ambit)
#
# Safe to run concurrently: one build per cache at a time (flock), each binary
# written under a unique temporary name and renamed into place, so a reader
# sees either no binary or a whole one. Tests never run this: `make tools`
# does, before them (a cold build takes minutes, longer than a test timeout).
set -euo pipefail
ver="${AMBIT_KUBE_VERSION:-v1.36.3}"
cache="${AMBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ambit}"
components=("${@:-kube-apiserver}")

path_of() { echo "$cache/$1-$ver/$1"; }

missing() {
	local c
	for c in "${components[@]}"; do
		[ -x "$(path_of "$c")" ] || echo "$c"
	done
}

print_paths() {
	local c
	for c in "${components[@]}"; do path_of "$c"; done
}

for c in "${components[@]}"; do
	case "$c" in
	kube-apiserver | kube-controller-manager | kube-scheduler) ;;
	*) echo "build.sh: unknown component $c" >&2; exit 2 ;;
	esac
done

if [ -z "$(missing)" ]; then print_paths; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
if ! flock -n 9; then
	echo "build.sh: another build holds $cache/.build.lock; waiting" >&2
	flock 9
fi
# Another process may have built them while this one waited.
todo=($(missing))
if [ ${#todo[@]} -eq 0 ]; then print_paths; exit 0; fi

work=$(mktemp -d)
tmp=""
trap 'rm -rf "$work" ${tmp:+"$tmp"}' EXIT
staging="v0.${ver#v1.}"
cd "$work"
echo "build.sh: building ${todo[*]} $ver from the Go module proxy (minutes on a cold cache)" >&2
start=$(date +%s)
gomod=$(go mod download -json "k8s.io/kubernetes@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -n "$gomod" ] || { echo "build.sh: cannot download k8s.io/kubernetes@$ver" >&2; exit 1; }
{
	echo "module ambit.local/kube"
	echo
	echo "go 1.26"
	echo
	echo "require k8s.io/kubernetes $ver"
	# every staging module that k8s.io/kubernetes replaces with ./staging/... is
	# published on the proxy as v0.Y.Z
	sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#replace \1 => \1 '"$staging"'#p' "$gomod"
} >go.mod
for c in "${todo[@]}"; do
	mkdir -p "$c"
	case "$c" in
	kube-apiserver) pkg=kube-apiserver/app; ctor=NewAPIServerCommand ;;
	kube-controller-manager) pkg=kube-controller-manager/app; ctor=NewControllerManagerCommand ;;
	kube-scheduler) pkg=kube-scheduler/app; ctor=NewSchedulerCommand ;;
	esac
	cat >"$c/main.go" <<GO
// Command $c is Kubernetes' $c, built from the module proxy.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/$pkg"
)

func main() { os.Exit(cli.Run(app.$ctor())) }
GO
done
GOFLAGS=-mod=mod go mod tidy >&2
for c in "${todo[@]}"; do
	out=$(path_of "$c")
	mkdir -p "$(dirname "$out")"
	tmp=$(mktemp "$out.XXXXXX")
	CGO_ENABLED=0 go build -trimpath -ldflags=-s -o "$tmp" "./$c" >&2
	chmod 0755 "$tmp"
	mv -f "$tmp" "$out"
	tmp=""
done
echo "build.sh: built ${todo[*]} in $(($(date +%s) - start)) s" >&2
print_paths
