# syntax=docker/dockerfile:1
# The image the Helm chart runs: every instream binary on a slim Debian, as a non-root user.
# No Docker engine runs on this project's CI machine, so CI lints this file (hadolint) but
# does not build it: `docker build -t instream:0.1.0 .` builds it.

FROM rust:1-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       cmake pkg-config libcurl4-openssl-dev libsasl2-dev libzstd-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Extra cargo features, e.g. `--build-arg CARGO_FEATURES=instream/gssapi,instream/kerberos`
# for Kerberos to Kafka and HDFS (libsasl2 is in the run-time stage for it).
ARG CARGO_FEATURES=""
# The `dist` profile: release code without debug sections.
RUN cargo build --profile dist --locked ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
      -p instream -p instream-ingest -p instream-enricher -p instream-aggregator \
      -p instream-archiver -p instream-query-api -p instream-db-source

FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="instream" \
      org.opencontainers.image.description="In-stream processing: ingest, enricher, aggregator, archiver, query-api, db-source and the instream CLI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Run-time libraries of librdkafka (TLS, SASL, OIDC through libcurl) and CA certificates;
# security updates of Debian stable are wanted, so versions are not pinned.
ARG CARGO_FEATURES=""
# The Kerberos plug-in of libsasl2 only for a GSSAPI build (word splitting of the optional
# package name is meant).
# hadolint ignore=DL3008,SC2046
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libcurl4 libsasl2-2 libssl3 \
       $(case "$CARGO_FEATURES" in *gssapi*) echo libsasl2-modules-gssapi-mit;; esac) \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin instream
COPY --from=build /src/target/dist/instream /src/target/dist/instream-ingest \
     /src/target/dist/instream-enricher /src/target/dist/instream-aggregator \
     /src/target/dist/instream-archiver /src/target/dist/instream-query-api \
     /src/target/dist/instream-db-source \
     /usr/local/bin/
USER 10001:10001
EXPOSE 8080 8081 9464
# Each Deployment names its binary (instream-ingest, …); `instream` is the CLI.
ENTRYPOINT []
CMD ["instream", "--help"]
