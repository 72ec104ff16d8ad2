#!/usr/bin/env bash
# Builds Kubernetes binaries (default: kube-apiserver) of one release from the Go module proxy into
# a cache directory keyed by version, and prints that directory. A binary already in the cache is
# not built again, so repeated runs take a second.
#
#   scripts/k8s-binaries.sh VERSION [BINARY...]    e.g. scripts/k8s-binaries.sh v1.34.4 kube-apiserver kubelet
#
# BINARY is the name of a command under k8s.io/kubernetes/cmd/ (kube-apiserver, kubelet,
# kube-controller-manager, kube-scheduler, kube-proxy, ...). The cache is
# $MESHLESS_CACHE/kubernetes-VERSION (MESHLESS_CACHE defaults to /var/cache/meshless).
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces its staging modules (k8s.io/api,
# k8s.io/client-go, ...) with directories of its own tree. So the build happens in a scratch module
# that requires k8s.io/kubernetes and replaces each staging module with its published release
# (v0.X.Y for Kubernetes v1.X.Y), taken from the Go module proxy like any other module.
set -euo pipefail

usage() {
	echo "usage: $0 VERSION [BINARY...]   (VERSION like v1.34.4; BINARY defaults to kube-apiserver)" >&2
	exit 2
}
[ $# -ge 1 ] || usage
version=$1
shift
[[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || usage
minor=${BASH_REMATCH[1]}
patch=${BASH_REMATCH[2]}
staging_version="v0.$minor.$patch"
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || binaries=(kube-apiserver)
for b in "${binaries[@]}"; do
	[[ $b =~ ^[a-z0-9-]+$ ]] || usage
done

export PATH="$PATH:/usr/local/go/bin"
# The caller's GOFLAGS (-mod=vendor, say) and go.work do not fit the scratch module.
export GOFLAGS=-buildvcs=false GOWORK=off
cache_dir="${MESHLESS_CACHE:-/var/cache/meshless}/kubernetes-$version"
mkdir -p "$cache_dir"

# Concurrent runs (two test targets, two shells) wait for each other instead of building twice.
exec 9>"$cache_dir/.lock"
flock 9

missing=()
for b in "${binaries[@]}"; do
	[ -x "$cache_dir/$b" ] || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
	echo "$cache_dir"
	exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The scratch module: stdout stays clean for the cache path, progress goes to stderr.
go mod init meshless.local/kubernetes-binaries >/dev/null 2>&1
gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[ -f "$gomod" ] || { echo "k8s-binaries: go.mod of k8s.io/kubernetes@$version not found" >&2; exit 1; }
staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$gomod")
[ -n "$staging" ] || { echo "k8s-binaries: no staging modules in $gomod" >&2; exit 1; }
{
	echo "require k8s.io/kubernetes $version"
	for m in $staging; do
		echo "replace $m => $m $staging_version"
	done
	for b in "${missing[@]}"; do
		echo "tool k8s.io/kubernetes/cmd/$b"
	done
} >>go.mod
echo "k8s-binaries: resolving k8s.io/kubernetes $version (staging modules at $staging_version)" >&2
go mod tidy >&2

ldflags="-s -w"
ldflags+=" -X k8s.io/component-base/version.gitVersion=$version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
for b in "${missing[@]}"; do
	echo "k8s-binaries: building $b $version" >&2
	start=$SECONDS
	# Built under a temporary name and renamed: an interrupted build never leaves a binary that a
	# later run would take as cached.
	CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$cache_dir/.$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2
	mv "$cache_dir/.$b.tmp" "$cache_dir/$b"
	echo "k8s-binaries: built $b in $((SECONDS - start))s" >&2
done
echo "$cache_dir"
