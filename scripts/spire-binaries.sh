#!/usr/bin/env bash
# Builds spire-server and spire-agent (the tests of pkg/spire run them) from the Go module proxy
# into a cache directory keyed by version, and does nothing when they are already there. They are
# built in a scratch module inside that directory, not through meshless's go.mod, so SPIRE's
# dependencies never enter meshless's own dependency graph.
# Usage: scripts/spire-binaries.sh [DIR]   (default /var/cache/meshless/spire-$SPIRE_VERSION)
# The binaries land in DIR/bin; SPIRE's source stays in the Go module cache.
set -euo pipefail

SPIRE_VERSION=v1.13.3
dir=${1:-${MESHLESS_SPIRE_DIR:-/var/cache/meshless/spire-$SPIRE_VERSION}}
bin=$dir/bin

if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ]; then
	exit 0
fi
if ! command -v go >/dev/null 2>&1; then
	export PATH=$PATH:/usr/local/go/bin
fi
mkdir -p "$dir"
# Two concurrent runs (make test and a developer's shell) must not build over each other.
exec 9>"$dir/.lock"
flock 9
if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ]; then
	exit 0
fi

echo "spire-binaries: building spire-server and spire-agent $SPIRE_VERSION into $bin" \
	"(about 12 minutes on a fresh 2-core machine; log: $dir/build.log)"
start=$(date +%s)
mod=$dir/module
rm -rf "$mod" "$bin.tmp" "$dir/gocache"
mkdir -p "$mod"
cd "$mod"
# GOFLAGS from the caller (such as -mod=vendor) would not fit this scratch module. The compiled
# packages of SPIRE's dependencies (2.4 GB) serve nothing once the binaries exist, so they go to
# a build cache of their own that is removed afterwards.
export GOFLAGS=-buildvcs=false GOWORK=off GOCACHE=$dir/gocache
# Chained with &&: set -e does not apply inside a function called as an if condition.
build() {
	go mod init meshless.local/spire-tools &&
		go get -tool "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION" &&
		go get -tool "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION" &&
		# The SQLite datastore of spire-server needs cgo. Without symbol tables the link takes
		# half the time and the binaries a third less space.
		CGO_ENABLED=1 GOBIN=$bin.tmp go install -ldflags="-s -w" \
			github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
}
if ! build >"$dir/build.log" 2>&1; then
	echo "spire-binaries: build failed; the end of $dir/build.log:" >&2
	tail -n 30 "$dir/build.log" >&2
	exit 1
fi
rm -rf "$bin" "$dir/gocache"
mv "$bin.tmp" "$bin"
echo "spire-binaries: built in $(($(date +%s) - start))s"
