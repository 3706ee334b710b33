# shakedown as a container image: what in-cluster load agents run
# (`load.agents.where: in-cluster`), and shakedown itself for a CI runner
# pod. Multi-stage: a static musl binary on a distroless base, non-root.
#
#   docker build -t registry.example.com/shakedown:0.1 .
#   docker push registry.example.com/shakedown:0.1
FROM docker.io/library/rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# Static by default on musl; rustls, no OpenSSL.
RUN cargo build --release --locked --bin shakedown \
    && strip target/release/shakedown

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/release/shakedown /usr/local/bin/shakedown
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shakedown"]
