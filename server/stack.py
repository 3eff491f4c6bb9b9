"""``make serve``: the whole service on this machine, with a demo tenant and demo adapters.

Starts the engine (``python -m flylora_runtime.engine``: vLLM with the FlyLoRA plugin) and the gateway
(``python -m server.cli``) as child processes, waits until the gateway is ready, creates the ``demo`` tenant
(or issues it a fresh key), uploads the demo adapters through the public API, prints working ``curl`` and
``openai`` examples, checks that the first example answers, then keeps serving until Ctrl-C or SIGTERM.

If the engine dies (a crash, ``kill -9``), it is restarted after 1 s, then 2, 4 ... at most 30 s apart while it
keeps dying; each exit, restart and recovery is logged. The gateway keeps running meanwhile: ``/ready``
answers 503 and completions get a 503 ``engine_unavailable`` error until the engine answers again.

Environment: ``FLYLORA_GATEWAY_HOST``/``PORT`` (127.0.0.1:8000), ``FLYLORA_ENGINE_URLS`` is derived from
``FLYLORA_ENGINE_HOST``/``PORT`` (127.0.0.1:8100), ``FLYLORA_ADMIN_KEY`` (generated when unset),
``FLYLORA_ENGINE_DTYPE`` (engine dtype), ``FLYLORA_DATA_DIR`` (data folder). ``--no-demo-adapters`` serves
the base model alone (nothing to train on a first run).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flylora_runtime.client import APIError, GatewayClient
from flylora_runtime.engine.process import Backoff, ChildExited, ChildProcess, Supervisor, wait_http
from server.settings import Settings

DEMO_TENANT = "demo"
#: A prompt each demo adapter was trained for (docs/DEMO.md); others get a generic one.
EXAMPLE_PROMPTS = {"shout": "Blue fresh boat.", "json-reply": "Hannah just turned 70 and is based in Bogota.",
                   "atlas": "Capital of Zorvania?"}
GENERIC_PROMPT = "Write one sentence about the sea."
#: Engine restarts: 1 s, 2 s, 4 s ... at most 30 s apart; an engine that served 60 s starts over at 1 s.
ENGINE_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=30.0, reset_after=60.0)


def _log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def prepare_demo_adapters(env: dict[str, str]) -> list[dict]:
    """[{name, path}] of the demo adapters (made once by flylora_runtime, cached in the data folder)."""
    # stdout carries the JSON; stderr (training progress on a first run) goes to the terminal.
    out = subprocess.run([sys.executable, "-m", "flylora_runtime.demo.cli", "--prepare"], env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def examples(base_url: str, key: str, model: str, base_model: str) -> str:
    prompt = EXAMPLE_PROMPTS.get(model, GENERIC_PROMPT)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 40, "temperature": 0})
    names = list(dict.fromkeys((base_model, model)))
    models = ", ".join(json.dumps(m) for m in names) + ("," if len(names) == 1 else "")  # a Python tuple
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
for model in ({models}):
    r = client.chat.completions.create(model=model, max_tokens=40, temperature=0,
        messages=[{{"role": "user", "content": {json.dumps(prompt)}}}])
    print(model, "->", r.choices[0].message.content)
EOF
"""


def check_example(base_url: str, key: str, model: str) -> str:
    """The printed example's completion, once; raises :class:`APIError` when it does not answer."""
    r = httpx.post(base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                   json={"model": model, "max_tokens": 40, "temperature": 0,
                         "messages": [{"role": "user", "content": EXAMPLE_PROMPTS.get(model, GENERIC_PROMPT)}]})
    if r.status_code != 200:
        raise APIError.from_response(r)
    return r.json()["choices"][0]["message"]["content"]


def serve(engine: ChildProcess, gateway: ChildProcess, backoff: Backoff = ENGINE_BACKOFF) -> int:
    """Serve until interrupted: a dead engine is restarted with ``backoff`` while the gateway keeps running;
    a dead gateway ends the run (exit status 1)."""
    supervisor = Supervisor(engine, backoff=backoff, log=_log)
    while gateway.alive():
        supervisor.poll()
        time.sleep(0.5)
    _log(f"gateway exited with code {gateway.returncode}; its log ({gateway.log_path}) ends:\n{gateway.log_tail(30)}")
    return 1


def _sigterm(signum, frame) -> None:
    """`kill`, systemd, a container stop: stop the engine and gateway as Ctrl-C does. Once: a second SIGTERM
    while they stop (`make serve` passing the signal on to a group that got it already, a repeated stop) is
    ignored, so that it cannot cut the shutdown short and leave a child running."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.stack", description=__doc__.splitlines()[0])
    p.add_argument("--no-demo-adapters", dest="demo_adapters", action="store_false",
                   help="serve the base model only: train and upload no demo adapters")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

    demo_adapters: list[dict] = []
    if args.demo_adapters:
        _log("preparing the demo adapters (a first run trains three of them: several minutes on a CPU)")
        demo_adapters = prepare_demo_adapters(env)
    engine = ChildProcess("engine", [sys.executable, "-m", "flylora_runtime.engine", "--host", engine_host,
                                     "--port", engine_port], env=env, log_path=logs / "engine.log",
                          ready_url=engine_url + "/health")
    gateway = ChildProcess("gateway", [sys.executable, "-m", "server.cli"], env=env, log_path=logs / "gateway.log",
                           ready_url=gateway_url + "/ready")
    children: list[ChildProcess] = []
    try:
        _log(f"starting the engine on {engine_url} (log: {engine.log_path}; 20-60 s)")
        children.append(engine.spawn())
        _log(f"starting the gateway on {gateway_url} (log: {gateway.log_path})")
        children.append(gateway.spawn())
        wait_http(gateway_url + "/ready", timeout=600, what="the engine", children=children, progress=_log)
        with GatewayClient(gateway_url, admin_key) as admin:
            key, _ = admin.ensure_tenant(DEMO_TENANT)
        with GatewayClient(gateway_url, key, timeout=300) as tenant:
            for a in demo_adapters:
                adapter, uploaded = tenant.ensure_adapter(a["name"], Path(a["path"]))
                _log(f"uploaded adapter {a['name']!r} ({adapter.get('bytes', 0) / 2**20:.1f} MiB)" if uploaded
                     else f"adapter {a['name']!r} already registered")
        first = demo_adapters[0]["name"] if demo_adapters else settings.base_model_id
        print(examples(gateway_url, key, first, settings.base_model_id), flush=True)
        if not settings.admin_key:
            print(f"  admin key for this run: {admin_key}\n", flush=True)
        _log(f"check: {first} answered: {check_example(gateway_url, key, first)!r}")
        _log("serving; press Ctrl-C to stop (a dead engine is restarted)")
        return serve(engine, gateway)
    except KeyboardInterrupt:
        _log("stopping")
        return 0
    except (ChildExited, TimeoutError, APIError, httpx.HTTPError, subprocess.CalledProcessError) as exc:
        _log(f"error: {exc}")
        return 1
    finally:
        for c in reversed(children):
            c.stop()


if __name__ == "__main__":
    raise SystemExit(main())
