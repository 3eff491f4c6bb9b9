"""Test helpers for the gateway: a uvicorn server in a thread, tiny adapters written with numpy (no torch)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from safetensors.numpy import save_file

from flylora_runtime.engine.process import free_port

#: A 2-layer Llama-shaped base model (hidden 64, intermediate 96, 4 heads / 2 KV heads).
TINY_BASE_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2,
}
#: Another base model (hidden 128): an adapter made for it does not fit TINY_BASE_CONFIG.
OTHER_BASE_CONFIG = {**TINY_BASE_CONFIG, "hidden_size": 128, "intermediate_size": 192}

#: The admin key of every test gateway (not a secret).
ADMIN_KEY = "test-admin-key-not-secret-0123456789"

PICKLE_BYTES = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."


class ServerThread:
    """Runs an ASGI app under uvicorn on a free loopback port, in a daemon thread: in this process, so a test
    can look inside the app (``app.state``). Services run as child processes use
    :mod:`flylora_runtime.engine.process`."""

    def __init__(self, app: Any, *, log_level: str = "warning", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def free_port_url() -> str:
    """A loopback URL on which nothing listens (for a dead replica)."""
    return f"http://127.0.0.1:{free_port()}"


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-made HTTP/1.1 request (e.g. a lying Content-Length) and return (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in header.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(header.split(b" ")[1]), rest


def write_base_model(folder: Path, config: dict[str, Any] = TINY_BASE_CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def adapter_files(folder: Path, *, base: dict[str, Any] = TINY_BASE_CONFIG, r: int = 4, top_k: int | None = 2,
                  targets: tuple[str, ...] = ("q_proj", "v_proj"), nan: bool = False,
                  wrong_shape: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Write adapter_config.json + adapter_model.safetensors (FlyLoRA when ``top_k``, else plain LoRA)."""
    folder.mkdir(parents=True, exist_ok=True)
    hidden, inter = base["hidden_size"], base["intermediate_size"]
    head_dim = hidden // base["num_attention_heads"]
    kv = base["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(base["num_hidden_layers"]):
        for t in targets:
            n_in, n_out = shapes[t]
            key = f"base_model.model.model.layers.{layer}.{parent[t]}.{t}"
            tensors[key + ".lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32) * 0.01
            tensors[key + ".lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32) * 0.01
            if top_k is not None:
                tensors[key + ".lora_topk_bias"] = np.zeros((r,), np.float32)
    first_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    if nan:
        tensors[first_a][0, 0] = np.nan
    if wrong_shape:
        tensors[first_a] = np.zeros((r, 3), np.float32)
    config: dict[str, Any] = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
                              "bias": "none", "base_model_name_or_path": "tiny-llama"}
    if top_k is not None:
        config["top_k"] = top_k
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    config_path.write_text(json.dumps(config))
    save_file(tensors, str(weights_path))
    return config_path, weights_path


def upload_form(name: str, config: bytes, weights: bytes, *, weights_filename: str = "adapter_model.safetensors"
                ) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    """httpx ``data=`` and ``files=`` for POST /v1/adapters."""
    return {"name": name}, {
        "config": ("adapter_config.json", config, "application/json"),
        "weights": (weights_filename, weights, "application/octet-stream"),
    }


def assert_openai_error(response: Any, status: int) -> dict[str, Any]:
    """The response has ``status`` and OpenAI's error shape; returns the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@contextmanager
def queued_tenants(admission: Any) -> Iterator[list[int]]:
    """While open, the tenant id of every request that found no free slot at the gateway's fair admission
    (``try_enter`` returned None, so it waited in its tenant's queue), in order; the admission is left as it was."""
    queued: list[int] = []
    try_enter = admission.try_enter

    def counting(tenant: int):
        slot = try_enter(tenant)
        if slot is None:
            queued.append(tenant)
        return slot

    admission.try_enter = counting
    try:
        yield queued
    finally:
        del admission.try_enter
