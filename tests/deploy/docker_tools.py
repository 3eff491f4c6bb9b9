"""Docker for the image tests (make image-test): a CLI that can build with BuildKit, the base image, a local
index for torch's CPU wheel, builds that are timed, containers waited on by their healthchecks."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flylora_runtime.paths import DEMO_MODEL_NAME

from tests.deploy.tools import REPO

#: What the public Dockerfile defaults stand for on a machine without a registry (deploy/docker/local-base-image.sh).
LOCAL_BASE = "flylora-local/python:3.11-bookworm"
PUBLIC_BASE = "python:3.11-slim-bookworm"
GATEWAY_IMAGE = "flylora-gateway:latest"
ENGINE_IMAGE = "flylora-engine:cpu"
#: The machine's CA store: an extra root of a TLS-intercepting proxy lives here (and in no image).
HOST_CA_BUNDLE = Path(os.environ.get("FLYLORA_BUILD_CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt")
WHEEL_DIR = Path(os.environ.get("FLYLORA_TORCH_WHEEL_DIR") or "/opt/wheels")
TORCH_WHEEL = "torch-2.13.0+cpu-*.whl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_major(docker: str) -> int | None:
    out = subprocess.run([docker, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    m = re.match(r"(\d+)\.", out)
    return int(m.group(1)) if m else None


def find_docker() -> str:
    """A docker CLI that reaches a daemon and builds with BuildKit (buildx, or the builtin one before 23.0)."""
    candidates = [os.environ.get("DOCKER"), shutil.which("docker"), "/usr/bin/docker"]
    reasons = []
    for docker in dict.fromkeys(c for c in candidates if c and os.path.isfile(c)):
        server = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                text=True, timeout=30)
        if server.returncode != 0:
            reasons.append(f"{docker}: no daemon ({server.stderr.strip()[:120]})")
            continue
        buildx = subprocess.run([docker, "buildx", "version"], capture_output=True, timeout=30).returncode == 0
        major = _client_major(docker)
        if buildx or (major is not None and major < 23):
            return docker
        reasons.append(f"{docker}: client {major} without buildx (BuildKit)")
    pytest.skip("no usable Docker: " + ("; ".join(reasons) or "no docker CLI") +
                " (make docker installs Debian's docker.io and starts dockerd)")


class Docker:
    def __init__(self, path: str):
        self.path = path
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True, input: str | None = None
                 ) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                              input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:6])} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def has_image(self, tag: str) -> bool:
        return self("image", "inspect", tag, check=False).returncode == 0

    def inspect(self, what: str, fmt: str) -> str:
        return self("inspect", "--format", fmt, what).stdout.strip()

    def image_size(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def version(self) -> dict[str, str]:
        out = self("version", "--format", "{{json .}}").stdout
        data = json.loads(out)
        return {"client": data["Client"]["Version"], "server": (data.get("Server") or {}).get("Version", "?")}

    def base_image(self) -> tuple[str, float | None]:
        """(the base to build on, seconds it took to make it here, or None when it was there already)."""
        wanted = os.environ.get("FLYLORA_IMAGE_BASE")
        if wanted:
            return wanted, None
        for tag in (PUBLIC_BASE, LOCAL_BASE):
            if self.has_image(tag):
                return tag, None
        if os.geteuid() != 0 or not shutil.which("debootstrap"):
            pytest.skip(f"no base image ({PUBLIC_BASE} or {LOCAL_BASE}) and cannot make one here "
                        "(needs root and debootstrap: see deploy/docker/local-base-image.sh)")
        start = time.monotonic()
        proc = subprocess.run([str(REPO / "deploy/docker/local-base-image.sh"), LOCAL_BASE], capture_output=True,
                              text=True, timeout=1200, env={**self.env, "DOCKER": self.path})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return LOCAL_BASE, time.monotonic() - start

    def build(self, target: str, tag: str, build_args: dict[str, str], log: Path) -> float:
        """``docker build --target`` with host networking (this machine reaches PyPI only so); seconds taken."""
        args = ["build", "--network", "host", "--progress", "plain", "--target", target, "-t", tag]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        if HOST_CA_BUNDLE.is_file():
            args += ["--secret", f"id=ca-bundle,src={HOST_CA_BUNDLE}"]
        if os.environ.get("FLYLORA_IMAGE_TEST_NO_CACHE"):
            args.append("--no-cache")
        start = time.monotonic()
        proc = self(*args, str(REPO), timeout=3600, check=False)
        took = time.monotonic() - start
        log.write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"building {target} failed; log {log}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        return took

    def wait_healthy(self, container: str, timeout: float) -> float:
        """Seconds until Docker's HEALTHCHECK reports the container healthy (fails if it exits or goes unhealthy)."""
        start = time.monotonic()
        while True:
            state = json.loads(self.inspect(container, "{{json .State}}"))
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                return time.monotonic() - start
            if not state.get("Running") or health == "unhealthy" or time.monotonic() - start > timeout:
                logs = self("logs", "--tail", "60", container, check=False)
                raise AssertionError(f"{container} is {health or state.get('Status')} after "
                                     f"{time.monotonic() - start:.0f} s:\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
            time.sleep(2)


class TorchIndex:
    """torch's CPU wheel from the local wheel folder, served as a package index on loopback for the build
    (the public CPU index, download.pytorch.org, is not reachable from every build machine)."""

    def __init__(self, root: Path):
        self.root = root
        self.server: http.server.ThreadingHTTPServer | None = None

    @staticmethod
    def wheel() -> Path | None:
        found = sorted(WHEEL_DIR.glob(TORCH_WHEEL)) if WHEEL_DIR.is_dir() else []
        return found[0] if found else None

    def __enter__(self) -> str:
        wheel = self.wheel()
        (self.root / "torch").mkdir(parents=True, exist_ok=True)
        (self.root / "torch" / wheel.name).symlink_to(wheel)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def seed_model_volume(docker: Docker, volume: str, demo_model_dir: Path) -> None:
    """Copy the demo model into a volume, owned by the images' user (the host copy is root's, mode 600)."""
    docker("run", "--rm", "--user", "0", "--entrypoint", "sh", "-v", f"{volume}:/data/models",
           "-v", f"{demo_model_dir}:/src:ro", GATEWAY_IMAGE, "-c",
           f"cp -r /src /data/models/{DEMO_MODEL_NAME} && chown -R 10001:10001 /data/models", timeout=300)


def pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", text, re.S))


def compose_command(docker: Docker) -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1, Debian's package), whichever is here."""
    if docker("compose", "version", check=False).returncode == 0:
        return [docker.path, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def tenant_with_adapter(url: str, admin_key: str, demo_model_dir: Path, folder: Path, name: str = "support") -> str:
    """Through the gateway at ``url``: a tenant ``acme`` and a small random FlyLoRA adapter ``name`` (r=8, q/v)
    uploaded for it; returns the tenant's key."""
    import httpx

    from tests.server.helpers import adapter_files

    with httpx.Client(base_url=url, timeout=300) as c:
        r = c.post("/admin/tenants", json={"name": "acme"}, headers={"authorization": f"Bearer {admin_key}"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        base = json.loads((demo_model_dir / "config.json").read_text())
        config, weights = adapter_files(folder, base=base, r=8, top_k=2, targets=("q_proj", "v_proj"))
        r = c.post("/v1/adapters", data={"name": name}, headers={"authorization": f"Bearer {key}"},
                   files={"config": ("adapter_config.json", config.read_bytes()),
                          "weights": ("adapter_model.safetensors", weights.read_bytes())})
        assert r.status_code == 201, r.text
    return key
