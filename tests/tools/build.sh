#!/usr/bin/env bash
# Builds the real Kubernetes binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy, kubectl, etcd) and the chart tools
# (helm, kubeconform) from the Go module proxy in one `go build`, once per
# version of go.mod/go.sum, plus the static pause binary from the kubernetes
# module's pause.c and a copy of that module's OpenAPI document (the schemas
# kubeconform checks against), and prints the directory that holds them.
# A second, small module (monitoring/) builds controller-gen and generates the
# Prometheus Operator's ServiceMonitor and PodMonitor CRDs from its Go types,
# for kubeconform too; it cannot share the first module's build (see its go.mod).
# A third (certmanager/) builds cert-manager's controller and copies its CRDs,
# which the operator's `spec.tls.issuerRef` test runs against; it needs
# k8s.io/* v0.26, so it cannot share either build.
# Progress goes to stderr; the last line of stdout is the directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${GEOML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/geoml}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/monitoring/go.mod" "$here/monitoring/go.sum" \
  "$here/certmanager/go.mod" "$here/certmanager/go.sum" | sha256sum | cut -c1-16)
out="$cache/k8s-$key/bin"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd helm kubeconform pause
  cert-manager-controller)

mkdir -p "$cache"
exec 9>"$cache/k8s-build.lock"
flock 9

complete() {
  for b in "${binaries[@]}"; do [ -x "$out/$b" ] || return 1; done
  [ -f "$out/kubernetes-swagger.json" ] && [ -f "$out/monitoring-crds/monitoring.coreos.com_servicemonitors.yaml" ] &&
    [ -f "$out/cert-manager-crds/crd-certificates.yaml" ]
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
    go.etcd.io/etcd/server/v3 \
    helm.sh/helm/v4/cmd/helm \
    github.com/yannh/kubeconform/cmd/kubeconform
  mv "$tmp/server" "$tmp/etcd"
  # The pod sandbox's pause process, from the same kubernetes module.
  k8s_dir=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)
  cc -Os -static -o "$tmp/pause" "$k8s_dir/build/pause/linux/pause.c"
  # The release's API schemas, for kubeconform (tests/src/schemas.rs).
  cp "$k8s_dir/api/openapi-spec/swagger.json" "$tmp/kubernetes-swagger.json"
  # The monitoring.coreos.com CRDs, generated from the Prometheus Operator's
  # API types by controller-gen (both from the second module).
  (cd "$here/monitoring" &&
    go build -o "$tmp/controller-gen" sigs.k8s.io/controller-tools/cmd/controller-gen &&
    "$tmp/controller-gen" crd:crdVersions=v1,maxDescLen=0 \
      paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 \
      output:crd:dir="$tmp/monitoring-crds")
  rm "$tmp/controller-gen"
  # cert-manager's controller and its CRDs (the third module). The CRD files
  # are Helm templates only in their labels, which are dropped.
  echo "building cert-manager's controller (the third tools module)" >&2
  (cd "$here/certmanager" &&
    go build -ldflags "-s -w" -o "$tmp/cert-manager-controller" \
      github.com/cert-manager/cert-manager/cmd/controller &&
    cm_dir=$(go list -m -f '{{.Dir}}' github.com/cert-manager/cert-manager) &&
    mkdir "$tmp/cert-manager-crds" &&
    for f in "$cm_dir"/deploy/crds/crd-*.yaml; do
      sed '/^  labels:$/d; /{{/d' "$f" >"$tmp/cert-manager-crds/${f##*/}"
    done)
  rm -rf "$out"
  mkdir -p "$(dirname "$out")"
  mv "$tmp" "$out"
  trap - EXIT
fi
echo "$out"
