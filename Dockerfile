# webhook-relay: built with the Rust image, run on Debian slim as a non-root user.
# One image serves every role: `serve`, `receiver`, `worker`, `demo-downstream`, and
# the tools (`dlq ...`, `topology ...`, `healthcheck URL`).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# The same build command CI runs. The cache mounts keep downloaded crates and compiled
# dependencies between builds (BuildKit, the default builder), so a code change
# recompiles the relay crate and redoes the link-time optimisation only (about two
# minutes on 2 cores); the binary is copied out of the cached target dir. The service
# binary alone: the benchmark is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin webhook-relay \
 && cp target/release/webhook-relay /usr/local/bin/webhook-relay

FROM debian:bookworm-slim
# ca-certificates: HTTPS downstreams and amqps:// brokers are verified against them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /usr/local/bin/webhook-relay /usr/local/bin/webhook-relay
USER 10001:10001
ENV LISTEN_ADDR=0.0.0.0:8000
EXPOSE 8000
# Process alive and serving HTTP. No curl in the image: the binary checks itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["webhook-relay", "healthcheck", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["webhook-relay"]
CMD ["serve"]
