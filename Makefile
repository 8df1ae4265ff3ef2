# geoml: `make test` is the one command that checks everything on a fresh
# machine (CI runs exactly it); `make generate` refreshes generated files.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test deps k8s-tools fmt lint generate control-plane cluster chart

# A fresh clone gains nothing from incremental state, which doubled the disk
# a build takes.
export CARGO_INCREMENTAL ?= 0

# The test build is also the lint pass: clippy-driver compiles the workspace's
# own crates (dependencies stay plain rustc), so clippy's checks cost no second
# build of every dependency. `make lint` is the same check without the tests.
test: deps k8s-tools fmt
	RUSTC_WORKSPACE_WRAPPER=clippy-driver RUSTFLAGS='-D warnings' $(CARGO) test --workspace --locked

deps:
	@bash tests/tools/deps.sh

k8s-tools: deps
	@bash tests/tools/build.sh >/dev/null

fmt:
	$(CARGO) fmt --all -- --check

lint: deps fmt
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

generate:
	$(CARGO) run -q -p geoml-operator -- crd > manifests/crds.yaml
	mkdir -p charts/geoml/crds
	cp manifests/crds.yaml charts/geoml/crds/geoml-crds.yaml

# A throwaway control plane for local development: make control-plane KUBECONFIG_OUT=/tmp/geoml.kubeconfig
KUBECONFIG_OUT ?= $(CURDIR)/target/dev.kubeconfig
control-plane: k8s-tools
	$(CARGO) run -q -p geoml-tests --bin control-plane -- --crds --kubeconfig $(KUBECONFIG_OUT)

# Throwaway one-node clusters with the operator running as a pod in the first:
# make cluster KUBECONFIG_OUT=/tmp/geoml.kubeconfig [DATACENTERS=3]
DATACENTERS ?= 1
cluster: k8s-tools
	$(CARGO) run -q -p geoml-tests --bin cluster -- --kubeconfig $(KUBECONFIG_OUT) --datacenters $(DATACENTERS)

# The sync-traffic dashboard's panels drawn from a Prometheus into an SVG, no
# Grafana needed: make dashboard-svg PROMETHEUS=127.0.0.1:9090 JOB=fashion-mnist-gaia
# [NAMESPACE=default] [MINUTES=30] [SVG=target/sync-traffic.svg]
# [DASHBOARD=charts/geoml/dashboards/training.json]
PROMETHEUS ?= 127.0.0.1:9090
JOB ?= .*
NAMESPACE ?= .*
MINUTES ?= 30
SVG ?= $(CURDIR)/target/sync-traffic.svg
DASHBOARD ?= charts/geoml/dashboards/sync-traffic.json
.PHONY: dashboard-svg
dashboard-svg:
	$(CARGO) run -q -p geoml-tests --bin render-dashboard -- --prometheus '$(PROMETHEUS)' \
	  --dashboard '$(DASHBOARD)' --var 'namespace=$(NAMESPACE)' --var 'job=$(JOB)' \
	  --minutes $(MINUTES) --out '$(SVG)'

# The chart's checks without a cluster: helm lint --strict, helm template |
# kubeconform -strict against local schemas, wrong values refused.
chart: k8s-tools
	$(CARGO) test -p geoml-tests --locked --test helm -- --skip helm_install
