# stagingprop in a container: build with the Rust toolchain, run on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin stagingprop

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --home-dir /var/lib/stagingprop stagingprop \
    && mkdir -p /var/lib/stagingprop/spool && chown -R stagingprop /var/lib/stagingprop
COPY --from=build /src/target/release/stagingprop /usr/local/bin/stagingprop
USER stagingprop
ENTRYPOINT ["stagingprop", "--config", "/etc/stagingprop/stagingprop.toml"]
CMD ["--help"]
