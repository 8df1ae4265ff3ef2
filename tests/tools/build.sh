#!/usr/bin/env bash
# Builds the real Kubernetes binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy, kubectl, etcd) from the Go module proxy
# in one `go build`, once per version of go.mod/go.sum, plus the static pause
# binary from the kubernetes module's pause.c, and prints the directory that
# holds them.
# Progress goes to stderr; the last line of stdout is the directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${GEOML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/geoml}
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
out="$cache/k8s-$key/bin"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd pause)

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
  # One invocation, so that the packages the binaries share compile once.
  go build -ldflags "$ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl \
    go.etcd.io/etcd/server/v3
  mv "$tmp/server" "$tmp/etcd"
  # The pod sandbox's pause process, from the same kubernetes module.
  k8s_dir=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)
  cc -Os -static -o "$tmp/pause" "$k8s_dir/build/pause/linux/pause.c"
  rm -rf "$out"
  mkdir -p "$(dirname "$out")"
  mv "$tmp" "$out"
  trap - EXIT
fi
echo "$out"
