#!/usr/bin/env bash
# Installs the system packages that meshless's tests and demo run (iptables, tcpdump, iproute2,
# curl, CA certificates, etcd for the tests against a real kube-apiserver) plus any package named
# as an argument, on Debian and Ubuntu. It calls apt-get only when something is missing, so
# repeated runs are quick and offline-safe.
set -euo pipefail

packages=(iptables tcpdump iproute2 curl ca-certificates etcd-server "$@")

if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
	echo "deps: Go is not installed; install Go 1.26 or newer from https://go.dev/dl/" >&2
	exit 1
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
	# Not Debian: say what is needed instead of guessing at another package manager.
	missing=()
	for cmd in iptables iptables-legacy iptables-nft tcpdump ip curl etcd; do
		command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "deps: missing commands: ${missing[*]}; install them with your package manager" >&2
		exit 1
	fi
	exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
	if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != installed ]; then
		missing+=("$pkg")
	fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
	if ! command -v sudo >/dev/null 2>&1; then
		echo "deps: missing packages ${missing[*]}; run as root to install them" >&2
		exit 1
	fi
	sudo=(sudo)
fi
echo "deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
