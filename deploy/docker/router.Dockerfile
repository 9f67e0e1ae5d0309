# syntax=docker/dockerfile:1.7
# onehead-router: small, no LibTorch. Build from the repository root:
#   docker build -f deploy/docker/router.Dockerfile -t onehead-router .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first: this layer is reused until a manifest or the lock file changes. Every
# member's manifest is copied (cargo resolves the whole workspace against the lock file) with
# empty sources; only the router's dependencies are compiled, and a failure fails the build.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY proto/Cargo.toml proto/build.rs proto/
COPY proto/proto proto/proto
COPY telemetry/Cargo.toml telemetry/
COPY engine/Cargo.toml engine/
COPY worker/Cargo.toml worker/
COPY router/Cargo.toml router/
COPY bench/Cargo.toml bench/
COPY loadgen/Cargo.toml loadgen/
COPY tests/Cargo.toml tests/
COPY fuzz/Cargo.toml fuzz/
COPY deploy/docker/stub-sources.sh /usr/local/bin/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    stub-sources.sh \
    && cargo build --release --locked -p onehead-router --bin onehead-router
COPY proto/src proto/src
COPY telemetry/src telemetry/src
COPY router/src router/src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch proto/src/lib.rs telemetry/src/lib.rs router/src/lib.rs router/src/main.rs \
    && cargo build --release --locked -p onehead-router --bin onehead-router

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 onehead && useradd --system --uid 10001 --gid onehead onehead
COPY --from=build /src/target/release/onehead-router /usr/local/bin/onehead-router
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/onehead-router"]
CMD ["--listen", "0.0.0.0:8080", "--metrics-listen", "0.0.0.0:9090"]
