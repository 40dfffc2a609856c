# refold: the service image. `docker compose up -d` builds it (see README,
# "Production stack (docker-compose)"); alone: `docker build -t refold .`.
#
# Two stages: the builder compiles the release binary (librdkafka is built from
# source by rdkafka-sys with ./configure and make), the runtime stage is
# debian:bookworm-slim with the binary, the shipped projections and migrations,
# and a non-root user.

# ---- builder -----------------------------------------------------------------
FROM rust:1-bookworm AS builder

# rdkafka-sys builds librdkafka with make and a C/C++ compiler; libz-sys finds
# zlib through pkg-config; the TLS/SASL support of the Kafka, Redis and
# Elasticsearch clients links the system OpenSSL (libssl-dev + pkg-config).
# Most of these are already in the rust image; listing them keeps the build
# independent of what that image happens to carry.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, in a layer of their own: a change to src/ does not
# rebuild them (librdkafka alone takes minutes). The empty main.rs and lib.rs
# stand in for the crate; Cargo.lock pins every version (--locked).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The crate itself. COPY keeps the files' own mtimes, which may be older than
# the placeholder build: touch them so cargo rebuilds the crate.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/refold /out/refold

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 refold \
    && useradd --system --uid 10001 --gid refold --no-create-home \
        --home-dir /var/lib/refold --shell /usr/sbin/nologin refold \
    && mkdir -p /var/lib/refold \
    && chown refold:refold /var/lib/refold

COPY --from=builder /out/refold /usr/local/bin/refold
COPY projections /app/projections
COPY migrations /app/migrations

# A refold.toml mounted at /app/refold.toml is read too (the working directory);
# the environment overrides it. Every REFOLD_* variable here must name a setting
# (README, Configuration): refold refuses unknown ones at start, and
# scripts/check-compose.py checks it.
WORKDIR /app
ENV REFOLD_LISTEN=0.0.0.0:8080 \
    REFOLD_DATA_DIR=/var/lib/refold \
    REFOLD_PROJECTIONS=/app/projections \
    REFOLD_MIGRATIONS=/app/migrations \
    REFOLD_LOG_FORMAT=json

# Numeric, so that runtimes can verify it is not root (runAsNonRoot).
USER 10001:10001
VOLUME ["/var/lib/refold"]
EXPOSE 8080

# `serve` by default; `migrate`, `status`, `replay NAME`, `demo` as arguments.
ENTRYPOINT ["refold"]
CMD ["serve"]
