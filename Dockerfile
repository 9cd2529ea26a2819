# foldercast: one binary, every subcommand (run, consume, gateway, replay, bench).
# Build stage: the bundled librdkafka needs only a C toolchain, which the rust image has.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY web web
RUN cargo build --release --locked --bin foldercast \
 && strip target/release/foldercast

# Runtime stage: a slim Debian, the binary, the demo fixtures, a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin foldercast
COPY --from=build /src/target/release/foldercast /usr/local/bin/foldercast
COPY fixtures /srv/foldercast/fixtures
WORKDIR /srv/foldercast
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["foldercast"]
CMD ["run", "--listen", "0.0.0.0:8080"]
