"""``make serve``: the whole service on this machine, with a demo tenant and demo adapters.

Starts the engine (``python -m flylora_runtime.engine.launcher``: vLLM with the FlyLoRA plugin) and the gateway
(``python -m server.cli``) as child processes, waits until the gateway is ready, creates the ``demo`` tenant
(or issues it a fresh key), uploads the demo adapters through the public API, prints working ``curl`` and
``openai`` examples, checks that the first example answers, then keeps serving until Ctrl-C.

Environment: ``FLYLORA_GATEWAY_HOST``/``PORT`` (127.0.0.1:8000), ``FLYLORA_ENGINE_URLS`` is derived from
``FLYLORA_ENGINE_HOST``/``PORT`` (127.0.0.1:8100), ``FLYLORA_ADMIN_KEY`` (generated when unset),
``FLYLORA_ENGINE_DTYPE`` (engine dtype), ``FLYLORA_DATA_DIR`` (data folder).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.settings import Settings

DEMO_TENANT = "demo"
#: A prompt each demo adapter was trained for (docs/DEMO.md); others get a generic one.
EXAMPLE_PROMPTS = {"shout": "Blue fresh boat.", "json-reply": "Hannah just turned 70 and is based in Bogota.",
                   "atlas": "Capital of Zorvania?"}
GENERIC_PROMPT = "Write one sentence about the sea."


def _log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


class Child:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(url: str, children: list[Child], what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline:
        for c in children:
            if not c.alive():
                raise RuntimeError(f"{c.name} exited with code {c.proc.returncode}; its log ({c.log}) ends:\n{c.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - last > 15:
            _log(f"still waiting for {what} ...")
            last = time.monotonic()
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def prepare_demo_adapters(env: dict[str, str]) -> list[dict]:
    """[{name, path}] of the demo adapters (made once by flylora_runtime, cached in the data folder)."""
    # stdout carries the JSON; stderr (training progress on a first run) goes to the terminal.
    out = subprocess.run([sys.executable, "-m", "flylora_runtime.demo.cli", "--prepare"], env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def ensure_tenant(client: httpx.Client) -> str:
    r = client.post("/admin/tenants", json={"name": DEMO_TENANT})
    if r.status_code == 409:  # it exists from an earlier run: keys are shown once, so issue a new one
        r = client.post(f"/admin/tenants/{DEMO_TENANT}/keys")
    r.raise_for_status()
    return r.json()["api_key"]


def ensure_adapter(client: httpx.Client, name: str, path: Path) -> None:
    if client.get(f"/v1/adapters/{name}").status_code == 200:
        _log(f"adapter {name!r} already registered")
        return
    with open(path / "adapter_config.json", "rb") as cfg, open(path / "adapter_model.safetensors", "rb") as w:
        r = client.post("/v1/adapters", data={"name": name},
                        files={"config": ("adapter_config.json", cfg), "weights": ("adapter_model.safetensors", w)},
                        timeout=600)
    if r.status_code != 201:
        raise RuntimeError(f"uploading {name!r} failed: {r.status_code} {r.text}")
    _log(f"uploaded adapter {name!r} ({r.json().get('bytes', 0) / 2**20:.1f} MiB)")


def examples(base_url: str, key: str, adapter: str) -> str:
    prompt = EXAMPLE_PROMPTS.get(adapter, GENERIC_PROMPT)
    body = json.dumps({"model": adapter, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 40, "temperature": 0})
    return f"""
The service is up: {base_url}  (tenant {DEMO_TENANT!r}, key below is shown once)

  export FLYLORA_KEY={key}

  curl -s {base_url}/v1/chat/completions -H "Authorization: Bearer $FLYLORA_KEY" \\
    -H "Content-Type: application/json" -d '{body}'

  curl -s {base_url}/v1/models -H "Authorization: Bearer $FLYLORA_KEY"

  .venv/bin/python - <<'EOF'
import os
from openai import OpenAI
client = OpenAI(base_url="{base_url}/v1", api_key=os.environ["FLYLORA_KEY"])
for model in ("SmolLM2-135M-Instruct", "{adapter}"):
    r = client.chat.completions.create(model=model, max_tokens=40, temperature=0,
        messages=[{{"role": "user", "content": {json.dumps(prompt)}}}])
    print(model, "->", r.choices[0].message.content)
EOF
"""


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill`, systemd, a container stop: stop the engine and gateway as Ctrl-C does


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    settings = Settings()
    env = dict(os.environ)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else "flk-admin-" + secrets.token_hex(24)
    engine_host = env.get("FLYLORA_ENGINE_HOST", "127.0.0.1")
    engine_port = env.get("FLYLORA_ENGINE_PORT", "8100")
    engine_url = f"http://{engine_host}:{engine_port}"
    env.update({"FLYLORA_ADMIN_KEY": admin_key, "FLYLORA_ENGINE_URLS": env.get("FLYLORA_ENGINE_URLS", engine_url),
                "FLYLORA_ADAPTER_STORE": str(settings.store_dir), "FLYLORA_DATA_DIR": str(settings.data_dir)})
    logs = settings.data_dir / "logs"
    gateway_url = f"http://{settings.gateway_host}:{settings.gateway_port}"

    _log("preparing the demo adapters (a first run trains three of them: several minutes on a CPU)")
    demo_adapters = prepare_demo_adapters(env)
    children: list[Child] = []
    try:
        _log(f"starting the engine on {engine_url} (log: {logs / 'engine.log'}; 20-60 s)")
        children.append(Child("engine", [sys.executable, "-m", "flylora_runtime.engine.launcher", "--host", engine_host,
                                         "--port", engine_port], env, logs / "engine.log"))
        _log(f"starting the gateway on {gateway_url} (log: {logs / 'gateway.log'})")
        children.append(Child("gateway", [sys.executable, "-m", "server.cli"], env, logs / "gateway.log"))
        wait_for(gateway_url + "/ready", children, "the engine")
        with httpx.Client(base_url=gateway_url, timeout=60,
                          headers={"Authorization": f"Bearer {admin_key}"}) as admin:
            key = ensure_tenant(admin)
        with httpx.Client(base_url=gateway_url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as tenant:
            for a in demo_adapters:
                ensure_adapter(tenant, a["name"], Path(a["path"]))
            first = demo_adapters[0]["name"]
            print(examples(gateway_url, key, first), flush=True)
            if not settings.admin_key:
                print(f"  admin key for this run: {admin_key}\n", flush=True)
            r = tenant.post("/v1/chat/completions", json={
                "model": first, "max_tokens": 40, "temperature": 0,
                "messages": [{"role": "user", "content": EXAMPLE_PROMPTS.get(first, GENERIC_PROMPT)}]})
            r.raise_for_status()
            _log(f"check: {first} answered: {r.json()['choices'][0]['message']['content']!r}")
        _log("serving; press Ctrl-C to stop")
        while all(c.alive() for c in children):
            time.sleep(1)
        dead = next(c for c in children if not c.alive())
        _log(f"{dead.name} exited with code {dead.proc.returncode}; log ends:\n{dead.tail()}")
        return 1
    except KeyboardInterrupt:
        _log("stopping")
        return 0
    except (RuntimeError, TimeoutError, httpx.HTTPError, subprocess.CalledProcessError) as exc:
        _log(f"error: {exc}")
        return 1
    finally:
        for c in reversed(children):
            c.stop()


if __name__ == "__main__":
    raise SystemExit(main())
