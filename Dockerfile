# syntax=docker/dockerfile:1
# Tally's container image. Multi-stage: build with the full Rust image, run on a slim Debian.

# --- build ----------------------------------------------------------------------------------
# rust:1-bookworm (buildpack-deps) already has what rdkafka's bundled librdkafka 2.12 needs
# with the `ssl` feature: gcc/g++, GNU make, bash, perl, python3, pkg-config, zlib1g-dev and
# libssl-dev (OpenSSL: Kafka TLS/SASL, PostgreSQL and ClickHouse TLS). No cmake.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tally \
    && install -m 0755 target/release/tally /usr/local/bin/tally

# --- run ------------------------------------------------------------------------------------
# Same Debian release as the builder, so glibc and zlib match the binary.
FROM debian:bookworm-slim
# OpenSSL 3 (linked by librdkafka and native-tls) and the system's root certificates.
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-create-home --uid 10001 tally
WORKDIR /app
COPY --from=build /usr/local/bin/tally /usr/local/bin/tally
# Data the binary reads relative to /app: the price table (prices.path = prices/default.toml)
# and the schemas (JSON Schemas, ClickHouse DDL, PostgreSQL migrations).
COPY prices ./prices
COPY schemas ./schemas
USER tally
ENTRYPOINT ["tally"]
CMD ["run"]
