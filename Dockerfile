# knoxgate container image.
#
#   docker build -t knoxgate:local .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -e KNOXGATE_POSTGRES_URL=postgres://django:secret@db:5432/app \
#     -e KNOXGATE_REDIS_URL=redis://redis:6379/0 knoxgate:local
#
# The binary links only libc, libm and libgcc_s (TLS is rustls), so the runtime image is
# distroless/cc: glibc and libgcc, no shell, no package manager. The builder is Debian 12
# (bookworm) as well, so both sides share one glibc.

FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Dependencies first, in a layer of their own that survives changes to src/: build them against
# placeholder targets (the stub script reads Cargo.toml), then throw the placeholders' output away.
COPY Cargo.toml Cargo.lock ./
COPY deploy/docker/stub-cargo-targets.sh /usr/local/bin/stub-cargo-targets
RUN stub-cargo-targets Cargo.toml \
    && cargo build --profile dist --locked \
    && rm -rf src target/dist/.fingerprint/knoxgate-* target/dist/deps/knoxgate-* \
        target/dist/deps/libknoxgate-* target/dist/knoxgate

# Then knoxgate itself. COPY keeps the build context's modification times, which can be older
# than the placeholders' build: the fingerprints removed above make cargo rebuild regardless.
COPY src ./src
RUN cargo build --profile dist --locked \
    && install -D -m 0755 target/dist/knoxgate /out/knoxgate

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="knoxgate" \
      org.opencontainers.image.description="Forward-auth sidecar that verifies django-rest-knox tokens" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=builder /out/knoxgate /usr/local/bin/knoxgate
# Numeric (distroless' nonroot user), so Kubernetes can check runAsNonRoot against the image.
USER 65532:65532
# 8080: /verify and /api/auth/*; 9090: /healthz, /readyz, /metrics.
EXPOSE 8080 9090
# No HEALTHCHECK: distroless has no shell and no curl to run one, and knoxgate has no probe
# subcommand. Orchestrators probe GET /healthz (liveness) and GET /readyz (readiness, Postgres
# reachable) on port 9090 themselves; see deploy/kubernetes/deployment.yaml.
ENTRYPOINT ["/usr/local/bin/knoxgate"]
CMD ["serve"]
