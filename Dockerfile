# Builds alice, bob and qkdctl, then a small runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins -p alice -p bob -p qkdctl \
 && mkdir /out && cp target/release/alice target/release/bob target/release/qkdctl /out/ \
 && strip /out/*

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/qkd qkd \
 && mkdir -p /var/lib/qkd /pki/ca /pki/nodes/alice /pki/nodes/bob /pki/apps /etc/qkd/pki /keks/alice /keks/bob \
    /data/alice /data/bob \
 && chown -R qkd:qkd /var/lib/qkd /pki /etc/qkd/pki /keks /data \
 && chmod 0700 /pki/ca /keks/alice /keks/bob /data/alice /data/bob
COPY --from=build /out/ /usr/local/bin/
COPY presets /usr/local/share/qkd/presets
COPY deploy /usr/local/share/qkd/deploy
USER qkd
WORKDIR /var/lib/qkd
CMD ["qkdctl", "--help"]
