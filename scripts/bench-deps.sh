#!/usr/bin/env bash
# Installs what `make bench` (and the benchmark harness's smoke test) runs besides meshless:
# stunnel4, haproxy, iperf3, wrk and nginx from Debian, through scripts/deps.sh (apt-get only for
# what is missing), and hey, built once per version from the Go module proxy into a cache
# directory keyed by version. It prints the path of the hey binary.
#
#   scripts/bench-deps.sh [HEY_VERSION]     (default v0.1.5; the cache is
#                                            $MESHLESS_CACHE/hey-VERSION, default /var/cache/meshless)
set -euo pipefail

hey_version=${1:-v0.1.5}
if [[ ! $hey_version =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
	echo "usage: $0 [HEY_VERSION]   (like v0.1.5)" >&2
	exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
cleanup=()
trap 'for f in "${cleanup[@]}"; do rm -rf "$f"; done' EXIT

# The packages' maintainer scripts would start nginx and haproxy as services of this machine; the
# benchmark runs its own, inside network namespaces. While installing, and only on a machine that
# has no policy-rc.d of its own, one that refuses every service start keeps them stopped.
if [ "$(id -u)" -eq 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\n# installed by meshless scripts/bench-deps.sh while it installs packages\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	cleanup+=(/usr/sbin/policy-rc.d)
fi
"$here/deps.sh" stunnel4 haproxy iperf3 wrk nginx >&2

export PATH="$PATH:/usr/local/go/bin"
cache_dir="${MESHLESS_CACHE:-/var/cache/meshless}/hey-$hey_version"
mkdir -p "$cache_dir"
# Concurrent runs wait for each other instead of building twice.
exec 9>"$cache_dir/.lock"
flock 9
if [ ! -x "$cache_dir/hey" ]; then
	work=$(mktemp -d)
	cleanup+=("$work")
	echo "bench-deps: building hey $hey_version" >&2
	# Outside any module: the caller's GOFLAGS and go.work do not apply to `go install pkg@version`.
	(cd "$work" && GOBIN="$work" GOFLAGS=-buildvcs=false GOWORK=off CGO_ENABLED=0 go install "github.com/rakyll/hey@$hey_version" >&2)
	# Renamed into place: an interrupted build never leaves a binary a later run takes as cached.
	mv "$work/hey" "$cache_dir/.hey.tmp"
	mv "$cache_dir/.hey.tmp" "$cache_dir/hey"
fi
echo "$cache_dir/hey"
