# syntax=docker/dockerfile:1
# push-server, multi-stage: build in the Rust image, run in a slim image as a non-root user.
#
#   docker build -f deploy/docker/push-server.Dockerfile -t push-server .
#   docker run --read-only --cap-drop=ALL --security-opt=no-new-privileges push-server --help
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
    cargo build --release --locked -p push-server --bin push-server \
    && cp target/release/push-server /usr/local/bin/push-server

FROM debian:bookworm-slim
# zlib for librdkafka; CA certificates for TLS brokers and registries.
RUN apt-get update && apt-get install -y --no-install-recommends zlib1g ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin push
COPY --from=build /usr/local/bin/push-server /usr/local/bin/push-server
USER 10001:10001
EXPOSE 8080 9090
# Listen on all interfaces inside the container; the admin port must stay private (docs/operations.md).
ENV PUSH_LISTEN=0.0.0.0:8080 PUSH_ADMIN_LISTEN=0.0.0.0:9090
# SIGTERM starts the drain (reconnects spread over --drain-window): give it the window.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/push-server"]
