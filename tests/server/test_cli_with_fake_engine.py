"""The ``flylora`` command line, end to end: the CLI as a process, against a real gateway process (real HTTP, real
SQLite) in front of the fake engine test double (the engine plays no part in these commands). Also what that
gateway process exposes: /metrics only on its metrics port, and the engine key sent upstream."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pty
import struct
import termios
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import BASE_ID, FakeEngine, start_fake_engine
from tests.server.helpers import PICKLE_BYTES, adapter_files, write_base_model
from tests.server.live import GATEWAY_ADMIN_KEY, REPO, GatewayProcess, clean_env, flylora

pytestmark = pytest.mark.timeout(300)
ENGINE_KEY = "engine-key-not-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[GatewayProcess, FakeEngine]]:
    data = tmp_path_factory.mktemp("cli-gateway")
    write_base_model(data / "models" / BASE_ID)
    engine = start_fake_engine(store=data / "adapters")
    try:
        with GatewayProcess(data, engine.url, FLYLORA_ENGINE_API_KEY=ENGINE_KEY,
                            FLYLORA_MAX_UPLOAD_BYTES=str(256 * 1024)) as gw:
            yield gw, engine
    finally:
        engine.server.stop()


@pytest.fixture(scope="module")
def gateway(stack) -> GatewayProcess:
    return stack[0]


def admin_env(gw: GatewayProcess, **extra: str) -> dict[str, str]:
    return clean_env(**{"FLYLORA_BASE_URL": gw.url, "FLYLORA_ADMIN_KEY": GATEWAY_ADMIN_KEY, **extra})


_tenants = itertools.count()


@pytest.fixture
def tenant(gateway) -> tuple[str, str]:
    name = f"cli-tenant-{next(_tenants)}"
    r = flylora("--json", "tenants", "create", name, env=admin_env(gateway))
    assert r.code == 0, r
    return name, r.json()["api_key"]


def tenant_env(gw: GatewayProcess, key: str, **extra: str) -> dict[str, str]:
    return clean_env(**{"FLYLORA_BASE_URL": gw.url, "FLYLORA_API_KEY": key, **extra})


# --- help -------------------------------------------------------------------------------------------------------

COMMANDS = [("tenants", "create"), ("tenants", "list"), ("tenants", "delete"), ("tenants", "new-key"),
            ("tenants", "keys"), ("tenants", "revoke-key"), ("adapters", "upload"), ("adapters", "list"),
            ("adapters", "show"), ("adapters", "delete")]


def test_help_is_complete():
    top = flylora("--help")
    assert top.code == 0
    for needle in ("FLYLORA_BASE_URL", "FLYLORA_API_KEY", "FLYLORA_ADMIN_KEY", "exit codes", "--json", "tenants",
                   "adapters"):
        assert needle in top.out, needle
    for code in range(10):
        assert f"\n  {code}  " in top.out
    for group in ("tenants", "adapters"):
        listed = flylora(group, "--help")
        assert listed.code == 0 and all(c in listed.out for g, c in COMMANDS if g == group)
    for group, command in COMMANDS:
        r = flylora(group, command, "--help")
        assert r.code == 0 and "exit codes" in r.out and "--json" in r.out, (group, command)
    assert flylora().code == 2 and flylora("tenants").code == 2 and flylora("nope").code == 2


def test_the_console_script_is_declared_and_the_cli_imports_neither_torch_nor_the_server():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flylora"] == "flylora_runtime.client.cli:main"
    probe = ("import sys, flylora_runtime.client.cli, flylora_runtime.client.validate; "
             "print(sorted(m for m in ('torch', 'vllm', 'server', 'fastapi') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done


# --- tenants and keys -----------------------------------------------------------------------------------------

def test_tenant_lifecycle_with_keys(gateway, tmp_path):
    env = admin_env(gateway)
    created = flylora("tenants", "create", "acme", "--max-concurrency", "5", env=env)
    assert created.code == 0, created
    first = created.out.strip().splitlines()[-1]
    assert first.startswith("flk-") and "shown once" in created.out
    assert flylora("tenants", "create", "acme", env=env).code == 6

    listed = flylora("tenants", "list", "--json", env=env).json()
    acme = next(t for t in listed["data"] if t["name"] == "acme")
    assert acme["max_concurrency"] == 5 and acme["adapters"] == 0
    assert "acme" in flylora("tenants", "list", env=env).out

    second = flylora("--json", "tenants", "new-key", "acme", "--label", "ci", env=env).json()
    keys = flylora("tenants", "keys", "acme", "--json", env=env)
    assert keys.code == 0 and first not in keys.out and second["api_key"] not in keys.out
    ids = [k["id"] for k in keys.json()["data"]]
    assert ids[-1] == second["key_id"] and [k["label"] for k in keys.json()["data"]] == [None, "ci"]
    table = flylora("tenants", "keys", "acme", env=env).out
    assert "KEY ID" in table and "ci" in table and first[-4:] in table

    # Revoke the first key: it stops; the second works; the tenant stays.
    assert flylora("tenants", "revoke-key", "acme", str(ids[0]), env=env).code == 2  # no --yes, no terminal
    assert flylora("adapters", "list", env=tenant_env(gateway, first)).code == 0
    assert flylora("tenants", "revoke-key", "acme", str(ids[0]), "--yes", env=env).code == 0
    denied = flylora("--json", "adapters", "list", env=tenant_env(gateway, first))
    assert denied.code == 4 and denied.error()["error"]["code"] == "invalid_api_key", denied
    assert flylora("adapters", "list", env=tenant_env(gateway, second["api_key"])).code == 0
    assert flylora("tenants", "revoke-key", "acme", str(ids[0]), "-y", env=env).code == 5

    # Delete: refused without confirmation, then done, then 404.
    assert flylora("tenants", "delete", "acme", env=env, stdin="").code == 2
    assert any(t["name"] == "acme" for t in flylora("--json", "tenants", "list", env=env).json()["data"])
    assert flylora("tenants", "delete", "acme", "--yes", env=env).code == 0
    assert flylora("tenants", "delete", "acme", "--yes", env=env).code == 5
    assert flylora("adapters", "list", env=tenant_env(gateway, second["api_key"])).code == 4


def test_keys_and_urls_come_from_the_environment_and_flags_override(gateway):
    base = clean_env()
    r = flylora("--json", "tenants", "list", env=base)  # no key anywhere
    assert r.code == 2 and "FLYLORA_ADMIN_KEY" in r.error()["error"]["message"]
    wrong = admin_env(gateway, FLYLORA_ADMIN_KEY="wrong-admin-key-0123456789abcdef0123")
    assert flylora("tenants", "list", env=wrong).code == 4
    assert flylora("tenants", "list", "--admin-key", GATEWAY_ADMIN_KEY, env=wrong).code == 0
    assert flylora("tenants", "list", "--base-url", gateway.url, "--admin-key", GATEWAY_ADMIN_KEY,
                   env=base).code == 0
    dead = flylora("--json", "tenants", "list", env=admin_env(gateway, FLYLORA_BASE_URL="http://127.0.0.1:9"))
    assert dead.code == 9 and dead.error()["exit_code"] == 9
    assert flylora("adapters", "list", env=admin_env(gateway)).code == 2  # the admin key is not a tenant key
    bad_name = flylora("tenants", "create", "Bad/Name", env=admin_env(gateway))
    assert bad_name.code == 2 and "not a valid name" in bad_name.err


# --- adapters -------------------------------------------------------------------------------------------------

def test_adapter_upload_list_show_delete(gateway, tenant, tmp_path):
    _, key = tenant
    env = tenant_env(gateway, key)
    folder = tmp_path / "support"
    adapter_files(folder)
    up = flylora("--json", "adapters", "upload", str(folder), env=env)
    assert up.code == 0, up
    assert up.json()["id"] == "support" and up.json()["r"] == 4 and up.json()["top_k"] == 2
    again = flylora("adapters", "upload", str(folder), env=env)
    assert again.code == 6 and "already exists" in again.err
    assert [a["id"] for a in flylora("adapters", "list", "--json", env=env).json()["data"]] == ["support"]
    assert "support" in flylora("adapters", "list", env=env).out
    shown = flylora("adapters", "show", "support", env=env)
    assert shown.code == 0 and up.json()["sha256"] in shown.out
    assert flylora("adapters", "show", "nope", env=env).code == 5
    assert flylora("adapters", "delete", "support", env=env, stdin="").code == 2
    assert flylora("adapters", "delete", "support", "--yes", env=env).code == 0
    assert flylora("adapters", "show", "support", env=env).code == 5
    named = flylora("adapters", "upload", str(folder), "--name", "other-name", "-q", env=env)
    assert named.code == 0 and "other-name" in named.out


@pytest.mark.parametrize("case", ["nan", "wrong_shape", "pickle", "missing", "bad_config"])
def test_an_invalid_adapter_is_refused_locally_and_nothing_is_sent(gateway, tenant, tmp_path, case):
    _, key = tenant
    folder = tmp_path / "bad"
    config, weights = adapter_files(folder, nan=case == "nan", wrong_shape=case == "wrong_shape")
    if case == "pickle":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(PICKLE_BYTES)
    elif case == "missing":
        config.unlink()
    elif case == "bad_config":
        config.write_text(json.dumps({"r": 4, "top_k": 9, "target_modules": ["q_proj"]}))
    with socket.socket() as listener:  # stands where the gateway would be: counts connection attempts
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        r = flylora("--json", "adapters", "upload", str(folder), "--name", "bad", "--base-url", url,
                    env=tenant_env(gateway, key))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected: nothing was sent
    assert r.code == 3, r
    assert r.error()["error"]["type"] == "invalid_adapter" and r.out == ""


def test_shapes_that_do_not_fit_the_base_model_are_caught_locally_with_base_config(gateway, tenant, tmp_path):
    _, key = tenant
    folder = tmp_path / "other"
    adapter_files(folder, base={**json.loads((gateway_base(gateway)).read_text()), "hidden_size": 128,
                                "intermediate_size": 192})
    env = tenant_env(gateway, key)
    local = flylora("adapters", "upload", str(folder), "--base-config", str(gateway_base(gateway)), env=env)
    assert local.code == 3 and "shape" in local.err
    # Without the base config the local check cannot know; the gateway refuses it (400 -> exit 7).
    remote = flylora("--json", "adapters", "upload", str(folder), env=env)
    assert remote.code == 7 and remote.error()["error"]["code"] == "invalid_adapter", remote
    skipped = flylora("adapters", "upload", str(tmp_path / "nowhere"), "--no-validate", "--name", "x", env=env)
    assert skipped.code == 2


def test_upload_shows_a_progress_bar_on_a_terminal(gateway, tenant, tmp_path):
    _, key = tenant
    folder = tmp_path / "big"
    adapter_files(folder, r=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    size = (folder / "adapter_model.safetensors").stat().st_size
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        done = subprocess.run([sys.executable, "-m", "flylora_runtime.client", "adapters", "upload", str(folder)],
                              env=tenant_env(gateway, key), stdout=subprocess.PIPE, stderr=slave,
                              text=True, timeout=120)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert done.returncode == 0, done
    text = shown.decode(errors="replace")
    assert "uploading big" in text and "100%" in text and f"{size / 1024:.0f}k/{size / 1024:.0f}k" in text, text[-500:]


def test_the_progress_callback_counts_every_byte_and_the_upload_has_a_length(gateway, tenant, tmp_path):
    from flylora_runtime.client import GatewayClient

    class Recording(httpx.HTTPTransport):  # the real transport, noting each request's Content-Length
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request.headers.get("content-length"))
            return super().handle_request(request)

    _, key = tenant
    _, weights = adapter_files(tmp_path / "counted")
    seen: list[int] = []
    sent: list[str | None] = []
    with GatewayClient(gateway.url, key, transport=Recording()) as gw:
        out = gw.upload_adapter("counted", tmp_path / "counted", on_bytes=seen.append)
    assert out["id"] == "counted" and sum(seen) == weights.stat().st_size
    assert sent[0] is not None and int(sent[0]) > weights.stat().st_size


# --- what the gateway process exposes ------------------------------------------------------------------------

def test_metrics_are_served_on_the_metrics_port_only(gateway, tenant):
    name, key = tenant
    assert flylora("adapters", "list", env=tenant_env(gateway, key)).code == 0
    public = httpx.get(gateway.url + "/metrics", timeout=10)
    assert public.status_code == 404 and "flylora_" not in public.text and name not in public.text
    assert set(public.json()["error"]) == {"message", "type", "param", "code"}
    private = httpx.get(gateway.metrics_url + "/metrics", timeout=10)
    assert private.status_code == 200 and "flylora_" in private.text
    assert httpx.get(gateway.metrics_url + "/v1/models", timeout=10).status_code == 404


def test_the_gateway_sends_the_engine_key_upstream(gateway, stack, tenant):
    _, engine = stack
    _, key = tenant
    r = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": BASE_ID, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert engine.state.requests[-1]["headers"]["authorization"] == f"Bearer {ENGINE_KEY}"


def gateway_base(gw: GatewayProcess) -> Path:
    return Path(gw.env["FLYLORA_DATA_DIR"]) / "models" / BASE_ID / "config.json"
