# docworker: the `worker` daemon in a distroless image of about 35 MB
# (distroless base-nossl ~15 MB + the stripped binary ~19 MB).
#
#   docker build -t docworker:latest .
#   docker run --rm docworker:latest --help
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# ---------------------------------------------------------------------------
# Builder. Bookworm on purpose: the binary links against the builder's glibc,
# and the runtime below is Debian 12 (bookworm) too, so it never needs a newer
# glibc than the runtime has. Move both together (e.g. to trixie /
# cc-debian13), never one alone.
# ---------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /build
# Symbols only make the image bigger (about 5 MB): the worker prints no
# backtraces. Set for both builds below so the dependency layer stays valid.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols

# 1. Dependencies only, cached as a layer until Cargo.toml or Cargo.lock
#    changes: build the locked dependency graph against stub sources, then
#    forget the stub's own artefacts (`cargo clean -p docworker` keeps every
#    dependency) so that the real build below cannot mistake them for
#    up-to-date output.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin worker \
    && cargo clean --release --locked -p docworker \
    && rm -rf src

# 2. The real sources. src/config.rs embeds config/default.toml and
#    src/store/schema.rs embeds sql/*.sql (include_str!), so both must be here before
#    the build. The touch makes every source newer than anything step 1 left.
COPY src/ src/
COPY sql/ sql/
COPY config/ config/
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    find src sql config -type f -exec touch {} + \
    && cargo build --release --locked --bin worker \
    && ./target/release/worker --version \
    && if ldd target/release/worker | grep -vE 'linux-vdso|ld-linux|/libc\.so|/libm\.so|/libgcc_s\.so'; then \
        echo "the binary needs a library the runtime image lacks (above)" >&2; exit 1; \
    fi \
    && mkdir -p /out/data/uploads /out/lib \
    && cp -L "$(gcc -print-file-name=libgcc_s.so.1)" /out/lib/libgcc_s.so.1

# ---------------------------------------------------------------------------
# Runtime: glibc, CA certificates, tzdata; no shell, no package manager, no
# OpenSSL (TLS is rustls). The binary also needs libgcc_s (Rust's unwinder,
# for the panics a job body may raise), which distroless ships only in its
# larger `cc` image (+ libstdc++, libgomp, OpenSSL: about 8 MB more): it is
# copied from the builder, the same Debian release, to /usr/lib, which the
# dynamic loader always searches. The builder step above fails if the binary
# ever needs another library. To use the cc image instead, change the FROM
# line to gcr.io/distroless/cc-debian12:nonroot (the copy is then harmless).
# `nonroot` is uid/gid 65532.
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/base-nossl-debian12:nonroot

ARG VERSION=0.1.0
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="docworker" \
      org.opencontainers.image.description="PostgreSQL-backed document-ingestion job queue worker: parses uploads, chunks, embeds with Ollama, upserts into ChromaDB" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

COPY --from=builder /out/lib/libgcc_s.so.1 /usr/lib/libgcc_s.so.1
COPY --from=builder /build/target/release/worker /usr/local/bin/worker
# /data/uploads owned by the worker's user: a fresh named volume mounted there
# starts with this ownership (needed for files.after_success = delete | move).
COPY --from=builder --chown=65532:65532 /out/data /data

# The upload root the app and the worker share (mount the same volume at the
# same path in both), and the HTTP listener that `worker health` (the
# HEALTHCHECK below) asks and that serves the metrics.
ENV DOCWORKER__FILES__UPLOAD_ROOT=/data/uploads \
    DOCWORKER__HTTP__ENABLED=true \
    DOCWORKER__HTTP__ADDRESS=0.0.0.0:9187

USER 65532:65532
EXPOSE 9187

# SIGTERM: stop claiming, give running jobs worker.shutdown_grace (30 s), hand
# back the rest; give the container a longer stop timeout than that (45 s).
STOPSIGNAL SIGTERM
# Healthy: the main loop turns and PostgreSQL answers (an embedder or Chroma
# outage pauses only the jobs that need them; `worker health --ready` tells).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/worker", "health", "--database"]

ENTRYPOINT ["/usr/local/bin/worker"]
CMD ["run"]
