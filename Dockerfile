# The image the Helm chart runs: every instream binary on a slim Debian.
# (No Docker engine on the CI machine: this file is not built there.)
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      cmake pkg-config libcurl4-openssl-dev libsasl2-dev libzstd-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p instream -p instream-ingest -p instream-enricher -p instream-aggregator -p instream-archiver -p instream-query-api -p instream-db-source

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      ca-certificates libcurl4 libsasl2-2 libzstd1 libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home instream
COPY --from=build /src/target/release/instream /src/target/release/instream-ingest \
     /src/target/release/instream-enricher /src/target/release/instream-aggregator \
     /src/target/release/instream-archiver /src/target/release/instream-query-api \
     /src/target/release/instream-db-source \
     /usr/local/bin/
USER 10001
EXPOSE 8080 9464
ENTRYPOINT []
