#!/usr/bin/env bash
# Builds the real Kubernetes control-plane binaries (kube-apiserver,
# kube-controller-manager, kubectl, etcd) from the Go module proxy, once per
# version of go.mod/go.sum, and prints the directory that holds them.
# Progress goes to stderr; the last line of stdout is the directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${GEOML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/geoml}
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
out="$cache/k8s-$key/bin"
binaries=(kube-apiserver kube-controller-manager kubectl etcd)

mkdir -p "$cache"
exec 9>"$cache/k8s-build.lock"
flock 9

complete() {
  for b in "${binaries[@]}"; do [ -x "$out/$b" ] || return 1; done
}

if ! complete; then
  command -v go >/dev/null || { echo "go is not installed; run 'make deps' first" >&2; exit 1; }
  k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")
  minor=$(echo "$k8s_version" | cut -d. -f2)
  pkg=k8s.io/component-base/version
  ldflags="-s -w -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  tmp=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "building Kubernetes $k8s_version and etcd from the Go module proxy (first run only; several minutes)" >&2
  cd "$here"
  go build -ldflags "$ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
  go build -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
  rm -rf "$out"
  mkdir -p "$(dirname "$out")"
  mv "$tmp" "$out"
  trap - EXIT
fi
echo "$out"
