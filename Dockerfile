# syntax=docker/dockerfile:1
# The ssegate image the Helm chart deploys (charts/ssegate: image.repository `ssegate`, image.tag
# defaulting to the chart's appVersion):
#
#   docker build -t ssegate:0.1.0 .
#
# Stage 1 builds on Debian 12 (bookworm, glibc 2.36) with the toolchain the repository uses
# (Rust 1.95). Stage 2 is distroless cc-debian12, `nonroot` variant: glibc, libgcc_s (Rust's
# unwinder), CA certificates, tzdata and an /etc/passwd with user nonroot (65532); no shell, no
# package manager. ssegate links only libc, libm, libgcc_s and the dynamic loader, all of which
# are there, and is built against the same glibc, so every symbol version it needs exists.
# TLS is rustls with webpki roots compiled in; no OpenSSL. C code (ring, and mimalloc, the
# binary's allocator) is compiled by the cc crate with the gcc that the rust slim image carries as
# its linker, and linked statically.
#
# It runs as the numeric user 65532 (so the kubelet can verify runAsNonRoot), on ports above
# 1024 (no capability needed), writing nothing to disk (the chart's readOnlyRootFilesystem).
# `ssegate run` with no flags binds exactly the EXPOSEd ports and runs in cluster mode.
#
# No Docker engine or registry is reachable where this repository is developed and tested, so
# CI never builds this image. scripts/image-check (run by scripts/test) verifies what can be
# verified without one: the release binary's shared libraries are all in cc-debian12 and need no
# newer glibc than bookworm's; it becomes ready as uid/gid 65532 on a read-only root file system
# started the way ENTRYPOINT + CMD start it; USER, EXPOSE, ENTRYPOINT/CMD, the image name and the
# version agree with the chart and Cargo.toml; .dockerignore keeps the build context small.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and the target directory between builds; the
# binary is copied out of the cached target directory. --locked: exactly Cargo.lock's versions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ssegate \
    && cp target/release/ssegate /ssegate \
    && /ssegate --version

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="ssegate" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Kubernetes-native ingress controller for Server-Sent Events"
COPY --from=build /ssegate /ssegate
USER 65532:65532
# Proxy (--listen), TLS (--listen-tls), admin: /metrics /healthz /readyz (--admin).
EXPOSE 8080 8443 10254
ENTRYPOINT ["/ssegate"]
CMD ["run"]
