#!/usr/bin/env bash
# Installs what ambit's build, tests and demo need on a Debian machine, and
# nothing that is already there. Idempotent; safe to run on every make.
#
#   install-deps.sh [base|integration|bench]...   (default: base)
set -euo pipefail
want=("${@:-base}")
pkgs=()
for w in "${want[@]}"; do
	case "$w" in
	base) pkgs+=(iproute2 util-linux etcd-server tcpdump kubectl clang llvm libbpf-dev protobuf-compiler libcap2-bin python3) ;; # libcap2-bin: capsh (bpf bypass test); python3: the kubelet tests' mapped image
	integration) pkgs+=(iproute2 util-linux etcd-server kubectl tcpdump) ;;
	bench) pkgs+=(iproute2 haproxy iperf3 nginx) ;; # fortio is built from the Go module proxy by bench/cmd/meshbench
	generate) pkgs+=(clang llvm libbpf-dev bpftool protobuf-compiler) ;;
	*) echo "install-deps.sh: unknown set $w" >&2; exit 2 ;;
	esac
done
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" = 0 ] || sudo=sudo
	echo "install-deps: installing ${missing[*]}" >&2
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
