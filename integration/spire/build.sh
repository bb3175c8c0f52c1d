#!/usr/bin/env bash
# Builds SPIRE's spire-server and spire-agent from the Go module proxy (inside a
# small wrapper module: `go install module/cmd@version` is refused here) and
# caches them outside the repository, keyed by version. Prints each binary's path.
#
#   build.sh [component...]   default: spire-server spire-agent
#
#   AMBIT_SPIRE_VERSION  SPIRE version (default v1.13.3)
#   AMBIT_CACHE          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ambit)
#
# Safe to run concurrently: one build per cache at a time (flock), each binary
# written under a unique temporary name and renamed into place, so a reader
# sees either no binary or a whole one. Tests never run this: `make tools`
# does, before them (a cold build takes about 9 minutes on 2 idle cores).
# spire-server's sqlite datastore is mattn/go-sqlite3: cgo, so a C compiler.
set -euo pipefail
ver="${AMBIT_SPIRE_VERSION:-v1.13.3}"
cache="${AMBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ambit}"
components=("${@:-spire-server}")
[ $# -gt 0 ] || components=(spire-server spire-agent)

path_of() { echo "$cache/spire-$ver/$1"; }

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
	spire-server | spire-agent) ;;
	*) echo "build.sh: unknown component $c" >&2; exit 2 ;;
	esac
done

if [ -z "$(missing)" ]; then print_paths; exit 0; fi

mkdir -p "$cache"
# Its own lock: a SPIRE build does not wait behind a Kubernetes one.
exec 9>"$cache/.spire-build.lock"
if ! flock -n 9; then
	echo "build.sh: another build holds $cache/.spire-build.lock; waiting" >&2
	flock 9
fi
# Another process may have built them while this one waited.
todo=($(missing))
if [ ${#todo[@]} -eq 0 ]; then print_paths; exit 0; fi

work=$(mktemp -d)
tmp=""
trap 'rm -rf "$work" ${tmp:+"$tmp"}' EXIT
cd "$work"
echo "build.sh: building ${todo[*]} $ver from the Go module proxy (about 9 minutes on a cold cache)" >&2
start=$(date +%s)
{
	echo "module ambit.local/spire"
	echo
	echo "go 1.26"
	echo
	echo "require github.com/spiffe/spire $ver"
	echo
	for c in "${todo[@]}"; do echo "tool github.com/spiffe/spire/cmd/$c"; done
} >go.mod
# One of SPIRE's dependencies (cloudsql-proxy) has a version the checksum
# database does not know.
GONOSUMDB="${GONOSUMDB:+$GONOSUMDB,}github.com/GoogleCloudPlatform/cloudsql-proxy" \
	GOFLAGS=-mod=mod go mod tidy >&2
for c in "${todo[@]}"; do
	out=$(path_of "$c")
	mkdir -p "$(dirname "$out")"
	tmp=$(mktemp "$out.XXXXXX")
	CGO_ENABLED=1 go build -trimpath -ldflags=-s -o "$tmp" "github.com/spiffe/spire/cmd/$c" >&2
	chmod 0755 "$tmp"
	mv -f "$tmp" "$out"
	tmp=""
done
echo "build.sh: built ${todo[*]} in $(($(date +%s) - start)) s" >&2
print_paths
