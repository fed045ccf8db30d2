# syntax=docker/dockerfile:1
# token-broker container image: a stripped release build on Debian bookworm, run from distroless
# as UID/GID 65532 (the Helm chart's securityContext expects that user), with OCI labels.
#
#   docker build -t ghcr.io/token-broker/token-broker:0.1.0 .
#
# Not built in the environment this file was written in (no Docker engine there): the stages
# follow the local build, which needs no protoc (protox), no OpenSSL (rustls) and no C toolchain
# beyond the C compiler in rust:*-bookworm (aws-lc-sys builds with it; no cmake).

# Base images by tag. NOT PINNED BY DIGEST: no digest could be checked where this file was
# written (no Docker engine, no registry access), and an invented one would be worse than none.
# To pin them, on a machine with Docker, run
#
#   docker buildx imagetools inspect rust:1.95-bookworm | sed -n 's/^Digest: *//p'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot | sed -n 's/^Digest: *//p'
#
# and append each printed digest to its tag below (rust:1.95-bookworm@sha256:...), or pass them
# with --build-arg RUST_IMAGE=...@sha256:... --build-arg RUNTIME_IMAGE=...@sha256:...
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# A stripped binary for the image only (no symbols, no debug info): Cargo.toml's release profile
# keeps line tables for everyone else (the benchmark's profiles and backtraces want them). Set
# for both builds below so that the cached dependencies match the final build's profile.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols

# 1. Dependencies only, cached until Cargo.toml or Cargo.lock change: the manifest names a
#    library, the binary, a build script, a test and a bench target, so stub each of them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/it benches \
    && echo 'fn main() {}' > build.rs \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cargo build --release --locked --bin token-broker \
    && rm -rf target/release/.fingerprint/token-broker-* target/release/build/token-broker-* \
        target/release/deps/token_broker-* target/release/deps/libtoken_broker-* \
        target/release/token-broker

# 2. The crate itself. COPY keeps the files' times, which may be older than the stubs': the
#    stale fingerprints were removed above, and touch makes sure anyway.
COPY build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY src ./src
RUN touch build.rs src/main.rs src/lib.rs \
    && cargo build --release --locked --bin token-broker \
    && install -D -m 0755 target/release/token-broker /out/token-broker

FROM ${RUNTIME_IMAGE}
# OCI annotations (https://github.com/opencontainers/image-spec/blob/main/annotations.md). Pass
# the commit and time when building:
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" \
#       --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t ghcr.io/token-broker/token-broker:0.1.0 .
ARG RUNTIME_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="gRPC sidecar that hands upstream credentials to the application in its pod" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/token-broker/token-broker" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
# distroless/cc has glibc, libgcc and the CA certificates rustls' platform verifier reads.
COPY --from=build /out/token-broker /usr/local/bin/token-broker
USER 65532:65532
# 50051: the token API (the chart keeps it on loopback or a Unix socket); 9464: admin
# (/metrics, /livez, /readyz, grpc.health.v1).
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/token-broker"]
CMD ["serve", "--config", "/etc/token-broker/config.toml"]
