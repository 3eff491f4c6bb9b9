"""The Docker images, built and run for real (``make image-test``; skipped in the normal suite, where a cold
build alone takes longer than the suite's budget).

Builds the ``gateway`` and ``engine-cpu`` targets of the Dockerfile (on the public python base when it is
there, else on a Debian base made here with debootstrap; torch's CPU wheel from the local wheel folder when
there; the machine's CA bundle as a build secret), runs both containers with host networking on loopback
ports, and checks: the images run as uid 10001; the CA bundle is in neither image; both HEALTHCHECKs pass;
an adapter uploaded through the gateway container is served by the engine container (the official openai
client gets a completion). Prints image sizes and build times and writes them to
``$FLYLORA_DATA_DIR/image-test.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from flylora_runtime.paths import data_dir

from tests.deploy.docker_tools import (Docker, ENGINE_IMAGE, GATEWAY_IMAGE, HOST_CA_BUNDLE, TorchIndex, find_docker,
                                       free_port, pem_blocks, seed_model_volume, tenant_with_adapter)

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(5400)]
if not os.environ.get("FLYLORA_IMAGE_TEST"):
    pytest.skip("builds and runs the Docker images (a cold build takes longer than the suite's budget): "
                "run `make image-test`", allow_module_level=True)

ADMIN_KEY = "image-test-admin-" + secrets.token_hex(8)
ENGINE_KEY = secrets.token_hex(24)  # shared by the two containers: the engine answers only the gateway
ENGINE_ARGS = ["--dtype", "bfloat16", "--max-loras", "2", "--max-cpu-loras", "4", "--max-model-len", "1024",
               "--max-num-seqs", "8", "--kv-cache-gib", "1"]
REPORT: dict = {}


def report_path() -> Path:
    return Path(os.environ.get("FLYLORA_IMAGE_TEST_REPORT") or data_dir() / "image-test.json")


@pytest.fixture(scope="module")
def docker() -> Docker:
    return Docker(find_docker())


@pytest.fixture(scope="module")
def images(docker, tmp_path_factory) -> dict:
    """Build both images; {target: {"tag", "build_s", "size_bytes"}}."""
    tmp = tmp_path_factory.mktemp("images")
    base, base_s = docker.base_image()
    REPORT.update(docker=docker.version(), base_image=base, base_image_made_here_s=base_s and round(base_s, 1),
                  ca_bundle_secret=str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.is_file() else None)
    build_args = {"PYTHON_IMAGE": base}
    built = {}
    with contextlib.ExitStack() as stack:
        if TorchIndex.wheel():
            build_args["TORCH_INDEX_URL"] = stack.enter_context(TorchIndex(tmp / "torch-index"))
        for target, tag in (("gateway", GATEWAY_IMAGE), ("engine-cpu", ENGINE_IMAGE)):
            took = docker.build(target, tag, build_args, tmp / f"build-{target}.log")
            built[target] = {"tag": tag, "build_s": round(took, 1), "size_bytes": docker.image_size(tag)}
    REPORT["images"] = built
    return built


class Stack:
    def __init__(self, gateway: str, engine: str, gateway_url: str, engine_url: str):
        self.gateway, self.engine = gateway, engine
        self.gateway_url, self.engine_url = gateway_url, engine_url


@pytest.fixture(scope="module")
def stack(docker, images, demo_model_dir) -> Iterator[Stack]:
    """Gateway and engine containers, host networking, loopback ports, shared adapter volume."""
    run_id = secrets.token_hex(4)
    names = {k: f"flylora-it-{k}-{run_id}" for k in ("gateway", "engine", "adapters", "registry", "models")}
    gport, eport, mport = free_port(), free_port(), free_port()
    try:
        for v in ("adapters", "registry", "models"):
            docker("volume", "create", names[v])
        seed_model_volume(docker, names["models"], demo_model_dir)
        # The gateway first: a fresh named volume takes the image's ownership of /data/adapters from the
        # first container that mounts it, and only the gateway mounts it writable.
        docker("run", "-d", "--name", names["gateway"], "--network", "host",
               "-e", "FLYLORA_GATEWAY_HOST=127.0.0.1", "-e", f"FLYLORA_GATEWAY_PORT={gport}",
               "-e", f"FLYLORA_ENGINE_URLS=http://127.0.0.1:{eport}", "-e", f"FLYLORA_ADMIN_KEY={ADMIN_KEY}",
               "-e", f"FLYLORA_ENGINE_API_KEY={ENGINE_KEY}", "-e", f"FLYLORA_METRICS_PORT={mport}",
               "-v", f"{names['adapters']}:/data/adapters", "-v", f"{names['registry']}:/data/registry",
               "-v", f"{names['models']}:/data/models:ro", GATEWAY_IMAGE)
        started = time.monotonic()
        docker("run", "-d", "--name", names["engine"], "--network", "host", "--shm-size", "2g",
               "-e", "FLYLORA_ENGINE_HOST=127.0.0.1", "-e", f"FLYLORA_ENGINE_PORT={eport}",
               "-e", f"FLYLORA_ENGINE_API_KEY={ENGINE_KEY}",
               "-v", f"{names['adapters']}:/data/adapters:ro", "-v", f"{names['models']}:/data/models:ro",
               ENGINE_IMAGE, *ENGINE_ARGS)
        REPORT["engine_args"] = ENGINE_ARGS
        docker.wait_healthy(names["gateway"], 120)
        docker.wait_healthy(names["engine"], 900)
        REPORT["engine_start_to_healthy_s"] = round(time.monotonic() - started, 1)
        yield Stack(names["gateway"], names["engine"], f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{eport}")
    finally:
        for c in ("gateway", "engine"):
            logs = docker("logs", "--tail", "200", names[c], check=False)
            (data_dir() / "logs").mkdir(parents=True, exist_ok=True)
            (data_dir() / "logs" / f"image-test-{c}.log").write_text(logs.stdout + logs.stderr)
            docker("rm", "-f", names[c], check=False)
        for v in ("adapters", "registry", "models"):
            docker("volume", "rm", "-f", names[v], check=False)


def test_images_run_as_the_unprivileged_user(docker, images, stack):
    for target, info in images.items():
        assert docker("image", "inspect", "--format", "{{.Config.User}}", info["tag"]).stdout.strip() == \
            "10001:10001", target
    for container in (stack.gateway, stack.engine):
        assert docker("exec", container, "id", "-u").stdout.strip() == "10001"
        # every process in the container, the engine's worker included
        uids = docker("exec", container, "sh", "-c", "cat /proc/[0-9]*/status | grep '^Uid:'").stdout.split()
        assert {u for u in uids if u.isdigit()} == {"10001"}, uids


def test_the_build_ca_bundle_is_in_no_image(docker, images):
    """The extra CA bundle was a BuildKit secret: no layer holds it, nor the combined bundle made from it."""
    if not HOST_CA_BUNDLE.is_file():
        pytest.skip(f"no CA bundle at {HOST_CA_BUNDLE}: the builds used none")
    host = pem_blocks(HOST_CA_BUNDLE.read_text())
    for target, info in images.items():
        tag = info["tag"]
        image_store = docker("run", "--rm", "--entrypoint", "cat", tag, "/etc/ssl/certs/ca-certificates.crt").stdout
        extra = sorted(host - pem_blocks(image_store))
        leftovers = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", tag, "-c",
                           "ls -A /run/secrets 2>/dev/null; ls -A /tmp")
        assert leftovers.stdout.strip() == "", f"{target}: {leftovers.stdout}"
        if not extra:
            continue  # the host trusts nothing the image's own store lacks: nothing to look for
        lines = extra[0].split()
        needle = lines[len(lines) // 2]  # a line of the extra root that no public root contains
        found = docker("run", "--rm", "--user", "0", "--entrypoint", "grep", tag, "-rlsF", needle, "/",
                       "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev", timeout=900, check=False)
        assert found.returncode == 1 and not found.stdout.strip(), f"{target} holds the build CA: {found.stdout}"
        REPORT.setdefault("ca_checked_extra_roots", len(extra))


def test_healthchecks_pass(docker, stack):
    for container in (stack.gateway, stack.engine):
        assert docker.inspect(container, "{{.State.Health.Status}}") == "healthy"
    assert httpx.get(stack.gateway_url + "/ready", timeout=10).status_code == 200


def test_an_adapter_uploaded_through_the_gateway_container_is_served_by_the_engine_container(stack, demo_model_dir,
                                                                                             tmp_path):
    key = tenant_with_adapter(stack.gateway_url, ADMIN_KEY, demo_model_dir, tmp_path / "adapter")
    client = OpenAI(base_url=stack.gateway_url + "/v1", api_key=key, timeout=300, max_retries=0)
    start = time.monotonic()
    chat = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=12, temperature=0)
    REPORT["first_adapter_completion_s"] = round(time.monotonic() - start, 2)
    text = chat.choices[0].message.content
    assert chat.model == "support" and text and chat.usage.completion_tokens > 0, chat
    REPORT["completion"] = {"model": chat.model, "prompt": "Name a colour.", "text": text,
                            "completion_tokens": chat.usage.completion_tokens}
    # The engine container loaded it from the volume the gateway container wrote.
    # Only the gateway can ask it: the engine refuses a request without the shared engine key.
    assert httpx.get(stack.engine_url + "/v1/models", timeout=10).status_code == 401
    engine_models = httpx.get(stack.engine_url + "/v1/models", timeout=10,
                              headers={"authorization": f"Bearer {ENGINE_KEY}"}).json()["data"]
    assert any(m["id"].startswith("fl-") for m in engine_models), engine_models


def test_report_sizes_and_build_times(images):
    """Not a timing assertion: the numbers, printed and written for docs/DEPLOYMENT.md."""
    assert all(info["size_bytes"] > 0 for info in images.values())
    report_path().parent.mkdir(parents=True, exist_ok=True)
    report_path().write_text(json.dumps(REPORT, indent=2) + "\n")
    print("\n[image-test] " + json.dumps(REPORT, indent=2))
    for target, info in images.items():
        print(f"[image-test] {target}: {info['size_bytes'] / 1e6:.0f} MB, built in {info['build_s']:.0f} s")
