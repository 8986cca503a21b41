# The ssegate image the Helm chart deploys (charts/ssegate: image.repository / image.tag).
#
#   docker build -t ssegate:0.1.0 .
#
# Stage 1 builds a fully static binary against musl (Alpine's Rust image targets
# x86_64/aarch64-unknown-linux-musl natively; ring and everything else link statically).
# Stage 2 is `scratch`: the binary, CA certificates (for upstream TLS to public backends) and
# nothing else, no shell, no package manager, running as the non-root user 65532, which the
# chart's securityContext (runAsNonRoot, readOnlyRootFilesystem, all capabilities dropped)
# expects. The ports are above 1024, so no capability is needed to bind them.

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and the target directory between builds; the
# binary is copied out of the cached target directory. --locked: exactly Cargo.lock's versions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ssegate \
    && cp target/release/ssegate /ssegate \
    && /ssegate --version

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /ssegate /ssegate
USER 65532:65532
# Proxy (--listen), TLS (--listen-tls), admin: /metrics /healthz /readyz (--admin).
EXPOSE 8080 8443 10254
ENTRYPOINT ["/ssegate"]
CMD ["run"]
