#!/usr/bin/env bash
# Installs what `make test` needs and a fresh machine may lack: Debian
# packages (among them the test clusters' container runtime: containerd,
# runc, the CNI plugins, iptables, conntrack), the Rust components, and a
# check that Go is new enough to build Kubernetes (tests/tools/go.mod names
# the version).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
need_pkgs=()
command -v flock >/dev/null || need_pkgs+=(util-linux)
command -v sha256sum >/dev/null || need_pkgs+=(coreutils)
command -v cc >/dev/null || need_pkgs+=(build-essential)
command -v objcopy >/dev/null || need_pkgs+=(binutils)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v nsenter >/dev/null || need_pkgs+=(util-linux)
command -v containerd >/dev/null || need_pkgs+=(containerd)
command -v runc >/dev/null || need_pkgs+=(runc)
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v conntrack >/dev/null || need_pkgs+=(conntrack)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need_pkgs+=(libc6-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing ${need_pkgs[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2
fi

command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup" >&2; exit 1; }
if command -v rustup >/dev/null; then
  for component in rustfmt clippy; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component" >&2
  done
fi

command -v go >/dev/null || { echo "go is missing: Go $(awk '/^go /{print $2}' "$here/go.mod") or newer is needed" >&2; exit 1; }
want=$(awk '/^go /{print $2}' "$here/go.mod")
have=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
  echo "go $have is older than $want; set GOTOOLCHAIN=go$want to let go fetch it from the module proxy" >&2
  exit 1
fi
