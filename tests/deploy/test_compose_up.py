"""docker-compose.yml brought up for real (``make image-test``, after test_images.py built the images): the
``cpu`` profile's gateway and engine on the compose networks, the gateway published on loopback only, the
demo model pre-seeded into the ``models`` volume (the ``model`` one-shot then finds it and exits 0: its
download needs PyPI, which containers here reach only with host networking). Prometheus and Grafana are not
started: their public images need a registry (tests/deploy/test_live_metrics.py runs Prometheus with the
same configuration against a live stack instead). Works with ``docker compose`` (v2) and Debian's
``docker-compose`` 1.29."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from flylora_runtime.paths import data_dir

from tests.deploy.docker_tools import (Docker, ENGINE_IMAGE, GATEWAY_IMAGE, compose_command, find_docker, free_port,
                                       seed_model_volume, tenant_with_adapter)
from tests.deploy.tools import COMPOSE, REPO

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]
if not os.environ.get("FLYLORA_IMAGE_TEST"):
    pytest.skip("runs docker-compose.yml with the built images: run `make image-test`", allow_module_level=True)

ADMIN_KEY = "compose-test-admin-" + secrets.token_hex(8)


class ComposeStack:
    def __init__(self, docker: Docker, cmd: list[str], project: str, env: dict[str, str]):
        self.docker, self.cmd, self.project, self.env = docker, cmd, project, env
        self.url = f"http://127.0.0.1:{env['GATEWAY_PUBLISH_PORT']}"

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.cmd, "-f", str(COMPOSE), "-p", self.project, "--profile", "cpu", *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env, cwd=REPO)
        if check:
            assert proc.returncode == 0, f"compose {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]


@pytest.fixture(scope="module")
def compose(demo_model_dir) -> Iterator[ComposeStack]:
    docker = Docker(find_docker())
    cmd = compose_command(docker)
    if cmd is None:
        pytest.skip("no Compose implementation (docker compose plugin or docker-compose)")
    for image in (GATEWAY_IMAGE, ENGINE_IMAGE):
        if not docker.has_image(image):
            pytest.skip(f"{image} not built (tests/deploy/test_images.py builds it)")
    project = f"flylora-it-{secrets.token_hex(3)}"
    env = {**os.environ, "FLYLORA_ADMIN_KEY": ADMIN_KEY, "FLYLORA_ENGINE_API_KEY": secrets.token_hex(24),
           "GATEWAY_PUBLISH_HOST": "127.0.0.1",
           "GATEWAY_PUBLISH_PORT": str(free_port()), "PATH": f"{os.path.dirname(docker.path)}:{os.environ['PATH']}"}
    stack = ComposeStack(docker, cmd, project, env)
    docker("volume", "create", "--label", f"com.docker.compose.project={project}",
           "--label", "com.docker.compose.volume=models", f"{project}_models")
    try:
        seed_model_volume(docker, f"{project}_models", demo_model_dir)
        stack("up", "-d", "--no-build", "gateway", "engine-cpu")
        yield stack
    finally:
        logs = stack("logs", "--no-color", "--tail", "200", check=False)
        (data_dir() / "logs").mkdir(parents=True, exist_ok=True)
        (data_dir() / "logs" / "compose-test.log").write_text(logs.stdout + logs.stderr)
        stack("down", "-v", "--remove-orphans", check=False)
        docker("volume", "rm", "-f", f"{project}_models", check=False)


def test_compose_stack_becomes_healthy_and_serves_an_adapter(compose, demo_model_dir, tmp_path):
    docker = compose.docker
    model = compose("ps", "-q", "-a", "model").stdout.split()
    assert model and docker.inspect(model[0], "{{.State.ExitCode}}") == "0"  # found the seeded model, exited 0
    start = time.monotonic()
    gateway, engine = compose.container("gateway"), compose.container("engine-cpu")
    docker.wait_healthy(engine, 900)
    docker.wait_healthy(gateway, 120)
    print(f"\n[compose-test] engine healthy {time.monotonic() - start:.0f} s after `up` returned")
    # The gateway is published on loopback only; the engine is not published at all.
    ports = json.loads(docker.inspect(gateway, "{{json .NetworkSettings.Ports}}"))
    assert [b["HostIp"] for b in ports["8000/tcp"]] == ["127.0.0.1"], ports
    assert not json.loads(docker.inspect(engine, "{{json .NetworkSettings.Ports}}")).get("8100/tcp"), "engine published"

    with httpx.Client(base_url=compose.url, timeout=300) as c:
        deadline = time.monotonic() + 60  # the gateway's own probe of the engine runs every 2 s
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/ready").text
            time.sleep(1)
    key = tenant_with_adapter(compose.url, ADMIN_KEY, demo_model_dir, tmp_path / "adapter")
    client = OpenAI(base_url=compose.url + "/v1", api_key=key, timeout=300, max_retries=0)
    chat = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0, chat
    print(f"[compose-test] completion through the compose stack: {chat.choices[0].message.content!r}")
