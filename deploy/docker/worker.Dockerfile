# syntax=docker/dockerfile:1.7
# onehead-worker with CUDA-enabled LibTorch 2.11: the same torch 2.11.0 wheel from PyPI that the
# project builds against (it brings its NVIDIA libraries). Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t onehead-worker .
# The torch environment lives at the same path in both stages, so the binary's rpath holds.

FROM python:3.11-slim-bookworm AS torch
# cudarc opens NCCL as libnccl.so, never as the wheel's libnccl.so.2: link one to the other, as
# scripts/setup-libtorch.sh does; the binary's rpath reaches this folder (worker/build.rs).
RUN python -m venv /opt/torch \
    && /opt/torch/bin/pip install --no-cache-dir "torch==2.11.0" \
    && ln -s libnccl.so.2 /opt/torch/lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so

FROM rust:1.95-slim-bookworm AS build
# A C++ compiler: torch-sys and the engine's build script (engine/csrc/*.cpp) compile against
# LibTorch's headers; the slim image has only gcc. make: tikv-jemalloc-sys builds jemalloc.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*
COPY --from=torch /opt/torch /opt/torch
COPY --from=torch /usr/local/lib/libpython3.11.so.1.0 /usr/local/lib/
ENV LIBTORCH=/opt/torch/lib/python3.11/site-packages/torch
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p onehead-worker --bin onehead-worker \
    && cp target/release/onehead-worker /usr/local/bin/onehead-worker

FROM python:3.11-slim-bookworm
COPY --from=torch /opt/torch /opt/torch
COPY --from=build /usr/local/bin/onehead-worker /usr/local/bin/onehead-worker
RUN groupadd --system --gid 10001 onehead \
    && useradd --system --uid 10001 --gid onehead --create-home onehead
ENV ONEHEAD_CACHE=/home/onehead/.cache/onehead
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/onehead-worker", "serve"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090"]
