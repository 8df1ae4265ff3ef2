# geoml's two images, built the way Rust operators ship: a build stage with
# the toolchain, then minimal runtime stages (distroless `cc`: glibc and
# libgcc only, no shell, user nonroot 65532).
#
#   docker build --target geoml          -t ghcr.io/geoml/geoml:0.1.0 .
#   docker build --target geoml-operator -t ghcr.io/geoml/geoml-operator:0.1.0 .
#
# The tag is the crates' version (Cargo.toml); the chart and the operator's
# `--image` default name these two. The test suite builds the same images
# without Docker (tests/src/image.rs) and loads them into its nodes.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p geoml-runtime --bin geoml -p geoml-operator --bin geoml-operator \
    && mkdir -p /out \
    && cp target/release/geoml target/release/geoml-operator /out/

# The data plane: `geoml ps | worker | registry | site | wan-proxy | data ...`.
FROM gcr.io/distroless/cc-debian12:nonroot AS geoml
COPY --from=build /out/geoml /usr/local/bin/geoml
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/geoml"]

# The operator: `geoml-operator run | crd`.
FROM gcr.io/distroless/cc-debian12:nonroot AS geoml-operator
COPY --from=build /out/geoml-operator /usr/local/bin/geoml-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/geoml-operator"]
