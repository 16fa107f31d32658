# syntax=docker/dockerfile:1
#
# Collie's container image: a release build on the pinned Rust toolchain, then
# a runtime stage that holds only the binary, the libraries it loads, the CA
# bundle and a passwd entry for its unprivileged user. No shell, no package
# manager. Build and run:
#
#   docker build --build-arg COLLIE_COMMIT=$(git rev-parse --short=12 HEAD) -t collie:0.1.0 .
#   docker run --read-only --network host -v "$PWD/conf:/etc/collie:ro" \
#     -v collie-data:/var/lib/collie -e OPENAI_API_KEY -e AZURE_OPENAI_KEY collie:0.1.0
#
# (conf/collie.yaml listens on 127.0.0.1: with the host's network, as here,
# or in a pod, that is the application's loopback.)
#
# The root filesystem can be read-only: Collie writes only its SQLite audit
# trail (and SQLite's temporary files) under /var/lib/collie.

# The toolchain Collie is built and tested with (rust-version in Cargo.toml
# is the oldest that compiles it). Bookworm matches the runtime libraries the
# build stage copies into the image.
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# cmake and a C/C++ toolchain build zlib-ng and SQLite (as deploy/setup.sh
# installs on a developer machine); ca-certificates supplies the image's CA
# bundle. Their versions follow the base image's bookworm release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake make g++ pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `collie --version` names the commit; .git is not in the build context, so
# pass it: docker build --build-arg COLLIE_COMMIT=$(git rev-parse --short=12 HEAD)
ARG COLLIE_COMMIT=unknown
# The release profile strips the binary (no debug info, no symbol table).
# The cache mounts keep crates and compiled dependencies between builds; the
# binary leaves the cache inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin collie \
 && deploy/container/rootfs.sh target/release/collie /rootfs

FROM scratch AS runtime
COPY --from=build /rootfs/ /
# /var/lib/collie belongs to the runtime user whatever a builder does with
# ownership across stages (--chown applies to what is copied: the entries of
# /var/lib). A new named volume mounted there takes its owner.
COPY --from=build --chown=10001:10001 /rootfs/var/lib/ /var/lib/
# 10001 is `collie` in the image's /etc/passwd; numeric, so that Kubernetes'
# runAsNonRoot can check it without reading the image.
USER 10001:10001
WORKDIR /var/lib/collie
ENV RUST_LOG=info \
    SQLITE_TMPDIR=/var/lib/collie
# The gateway (the config's `listen`) and the admin listener (`admin_listen`:
# /metrics, /healthz, /readyz). In a pod the gateway stays on 127.0.0.1 and
# only the admin port is reached from outside the container.
EXPOSE 8080 9090
# The audit trail; a named volume or an emptyDir keeps it writable when the
# root is read-only.
VOLUME ["/var/lib/collie"]
# SIGTERM drains: requests in flight (streams included) get up to the
# config's drain_timeout (30 s by default), those still running are cut off
# and get up to 5 s to be recorded, then about 2 s of server grace and the
# queued audit records are written. Give the container 50 s to stop
# (`docker stop -t 50`, terminationGracePeriodSeconds: 50).
STOPSIGNAL SIGTERM
# No HEALTHCHECK: the image has no shell or HTTP client to run one, and
# Kubernetes ignores it in favour of the probes in deploy/kubernetes. Probe
# http://<container>:9090/readyz from outside instead.
LABEL org.opencontainers.image.title="collie" \
      org.opencontainers.image.description="Per-tenant sidecar gateway for OpenAI-style LLM traffic" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/collie"]
CMD ["run", "--config", "/etc/collie/collie.yaml"]
