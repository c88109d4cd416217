# syntax=docker/dockerfile:1
# loadtest, multi-stage: build in the Rust image, run in a slim image as a non-root user.
#
#   docker build -f deploy/docker/loadtest.Dockerfile -t loadtest .
#   docker run --read-only --cap-drop=ALL --security-opt=no-new-privileges loadtest --help
#
# The root filesystem can be mounted read-only (`--read-only`, Kubernetes
# `readOnlyRootFilesystem: true`): the binary writes nothing to disk (logs go to stderr).
FROM rust:1-bookworm AS build
# librdkafka is built from source by rdkafka-sys: a C toolchain, make, zlib headers.
RUN apt-get update && apt-get install -y --no-install-recommends g++ make zlib1g-dev cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p loadtest --bin loadtest \
    && cp target/release/loadtest /usr/local/bin/loadtest

FROM debian:bookworm-slim
# zlib for librdkafka; CA certificates for TLS brokers and registries.
RUN apt-get update && apt-get install -y --no-install-recommends zlib1g ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin push
COPY --from=build /usr/local/bin/loadtest /usr/local/bin/loadtest
USER 10001:10001

ENTRYPOINT ["/usr/local/bin/loadtest"]
