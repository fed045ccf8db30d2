# syntax=docker/dockerfile:1
# token-broker container image: a release build on Debian bookworm, run from distroless as
# UID/GID 65532 (the Helm chart's securityContext expects that user).
#
#   docker build -t ghcr.io/token-broker/token-broker:0.1.0 .
#
# Not built in the environment this file was written in (no Docker engine there): the stages
# follow the local build, which needs no protoc (protox), no OpenSSL (rustls) and no C toolchain
# beyond the C compiler in rust:*-bookworm (aws-lc-sys builds with it; no cmake).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src

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
# distroless/cc has glibc, libgcc and the CA certificates rustls' platform verifier reads.
COPY --from=build /out/token-broker /usr/local/bin/token-broker
USER 65532:65532
# 50051: the token API (the chart keeps it on loopback or a Unix socket); 9464: admin
# (/metrics, /livez, /readyz, grpc.health.v1).
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/token-broker"]
CMD ["serve", "--config", "/etc/token-broker/config.toml"]
