# tracklet-collector in a container. Not built or run in this repository's CI (see
# docs/collector.md, "Containers").
#
#   docker build -t tracklet-collector .
#   docker run -e DATABASE_URL=postgres://... -p 8080:8080 tracklet-collector
#   # past one machine (docs/deploy.md): collectors publish to NATS JetStream, sinks commit
#   docker run -e DATABASE_URL=... -e TRACKLET_QUEUE=nats://nats:4222 -p 8080:8080 tracklet-collector
#   docker run -e DATABASE_URL=... -e TRACKLET_QUEUE=nats://nats:4222 \
#     -e TRACKLET_SINK_LISTEN=0.0.0.0:9091 tracklet-collector sink
#
# Build stage: the whole workspace (cargo needs every member's manifest), collector only.
FROM rust:1.95-slim-trixie AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile server -p tracklet-collector --bin tracklet-collector \
    && cp target/server/tracklet-collector /usr/local/bin/tracklet-collector

# Runtime stage: the binary alone (migrations are embedded in it).
FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/tracklet tracklet
COPY --from=builder /usr/local/bin/tracklet-collector /usr/local/bin/tracklet-collector
USER tracklet
WORKDIR /var/lib/tracklet
# Every flag has an environment variable (docs/collector.md, "Configuration"). Without
# DATABASE_URL the embedded SQLite file /var/lib/tracklet/tracklet.sqlite3 is used (mount a volume).
ENV TRACKLET_LISTEN=0.0.0.0:8080 \
    TRACKLET_LOG_FORMAT=json \
    TRACKLET_SQLITE_PATH=/var/lib/tracklet/tracklet.sqlite3
# 8080: serve; 9091: a sink's /healthz, /readyz and /metrics (with TRACKLET_SINK_LISTEN).
EXPOSE 8080 9091
STOPSIGNAL SIGTERM
ENTRYPOINT ["tracklet-collector"]
CMD ["serve"]
