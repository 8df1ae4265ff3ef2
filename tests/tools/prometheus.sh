#!/usr/bin/env bash
# Prints the path of a Prometheus server binary for the metrics tests,
# fetching it once: Debian's `prometheus` package is downloaded with
# `apt-get download` and unpacked with `dpkg-deb -x` into the cache, so
# nothing is installed system-wide.
set -euo pipefail

cache=${GEOML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/geoml}/prometheus
bin=$cache/root/usr/bin/prometheus
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ ! -x "$bin" ]; then
  work=$(mktemp -d "$cache/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && { apt-get download prometheus >&2 || { apt-get update -qq >&2 && apt-get download prometheus >&2; }; })
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  rm -rf "$cache/root"
  mv "$work/root" "$cache/root"
fi
"$bin" --version >/dev/null 2>&1 || { echo "$bin does not run" >&2; exit 1; }
echo "$bin"
