"""What one upload can cost the gateway, measured on the real gateway process (``python -m server.cli``):

* memory: the peak RSS (``VmHWM``) of the gateway grows by less than ``RSS_BOUND`` over a series of bombs
  (a 100 MB safetensors header of tiny objects, the issue's attack; a header at the bound; a 64 KiB
  config of nesting) and a 78 MB valid adapter, each refused (or stored) correctly;
* other tenants: while parallel uploads of large adapters run, another tenant's authenticated requests all
  succeed quickly (their key lookups do not wait behind upload work).

The base model is SmolLM2-135M's shape (30 layers), so the header bound is the demo model's (238 KiB).
"""

from __future__ import annotations

import json
import statistics
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.server.gateway_process import GatewayProcess, upload_in_subprocess
from tests.server.helpers import adapter_files

SMOL = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30}
#: The stated bound: one upload, whatever it holds, grows the gateway's peak RSS by less than this.
RSS_BOUND = 32 << 20


def big_adapter(folder: Path, *, r: int = 32, dtype=np.float64, seed: int = 0) -> tuple[Path, Path]:
    """A valid FlyLoRA adapter of SmolLM2's shape on every projection of every layer (78 MB in float64)."""
    folder.mkdir(parents=True, exist_ok=True)
    hidden, inter, kv = SMOL["hidden_size"], SMOL["intermediate_size"], 192
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(SMOL["num_hidden_layers"]):
        for t, (n_in, n_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{parent[t]}.{t}"
            tensors[key + ".lora_A.weight"] = rng.standard_normal((r, n_in)).astype(dtype) * 0.01
            tensors[key + ".lora_B.weight"] = np.zeros((n_out, r), dtype)
            tensors[key + ".lora_topk_bias"] = np.zeros(r, dtype)
    config = {"peft_type": "LORA", "r": r, "top_k": 4, "lora_alpha": 2 * r, "target_modules": list(shapes)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder / "adapter_config.json", folder / "adapter_model.safetensors"


def _bombs(root: Path, good_config: Path) -> dict[str, tuple[Path, Path, int]]:
    """name -> (config, weights, expected status)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    # 100 MB: a list of 33 million empty objects (json.loads made 2.2 GB of them: the attack).
    header = b'{"k":[' + b"{}," * 33_333_000
    header += b"{}" + b" " * (100_000_000 - len(header) - 4) + b"]}"
    path = root / "header_100mb.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    out["header of 100 MB of tiny objects"] = (good_config, path, 400)
    del header
    limit = (30 * 7 * 3 + 64) * 256 + 64 * 1024  # the bound for this base model
    header = b"{" + b",".join(b'"%d":[[]]' % i for i in range(limit // 9))
    header = header[:limit - 1] + b"}"
    path = root / "header_at_bound.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    out["header at the bound, nested lists"] = (good_config, path, 400)
    nested = root / "nested_config.json"
    nested.write_bytes(b"[" * 32_000 + b"]" * 32_000)
    out["64 KiB config of nesting"] = (nested, path, 400)
    many = root / "many_config.json"
    many.write_bytes(b"[" + b"{}," * 21_000 + b"{}]")
    out["64 KiB config of tiny objects"] = (many, path, 400)
    return out


def test_one_upload_of_any_content_grows_the_gateway_rss_by_a_bounded_amount(tmp_path):
    good_config, good_weights = big_adapter(tmp_path / "big")
    assert good_weights.stat().st_size > 70_000_000
    bombs = _bombs(tmp_path / "bombs", good_config)
    with GatewayProcess(tmp_path / "gw", base_config=SMOL, max_upload_bytes=128 << 20,
                        max_stored_bytes_per_tenant=0) as gw:
        key, victim = gw.new_tenant("attacker"), gw.new_tenant("victim")
        # Warm-up: the first upload and the first refusal load what the upload path needs.
        small_config, small_weights = big_adapter(tmp_path / "small", r=8, dtype=np.float32)
        for name, weights in (("warm", small_weights), ("warm-bad", bombs["header at the bound, nested lists"][1])):
            proc = upload_in_subprocess(gw.url, key, name, small_config, weights)
            assert proc.communicate(timeout=300)[0].split()[0] in ("201", "400")
        base_hwm, base_rss = gw.status("VmHWM"), gw.status("VmRSS")
        cases = [*bombs.items(), ("valid 78 MB float64 adapter", (good_config, good_weights, 201))]
        for i, (label, (config, weights, expected)) in enumerate(cases):
            proc = upload_in_subprocess(gw.url, key, f"case-{i}", config, weights)
            # Another tenant, meanwhile: answered, and quickly.
            with gw.client(victim, timeout=30) as c:
                while proc.poll() is None:
                    t0 = time.perf_counter()
                    r = c.get("/v1/adapters")
                    assert r.status_code == 200 and time.perf_counter() - t0 < 2.0, (label, r.status_code)
                    time.sleep(0.05)
            out = proc.communicate()[0]
            status, body = int(out.split()[0]), out.split(" ", 1)[1]
            assert status == expected, (label, out)
            if status == 400:
                error = json.loads(body)["error"] if body.startswith("{") and body.rstrip().endswith("}") else None
                assert error is None or error["code"] == "invalid_adapter", out
            growth = gw.status("VmHWM") - base_hwm
            print(f"{label}: {status}, peak RSS growth {growth / 2**20:.1f} MiB "
                  f"(RSS {gw.status('VmRSS') / 2**20:.0f} MiB, before {base_rss / 2**20:.0f} MiB)")
            assert growth < RSS_BOUND, f"{label}: the gateway's peak RSS grew by {growth / 2**20:.0f} MiB"
        stored = [p for p in (tmp_path / "gw" / "adapters").iterdir() if p.name.startswith("fl-")]
        assert len(stored) == 2  # the warm-up and the valid one: nothing of the bombs


@pytest.mark.slow
def test_parallel_large_uploads_do_not_delay_other_tenants(tmp_path):
    config, weights = big_adapter(tmp_path / "big", dtype=np.float64)
    with GatewayProcess(tmp_path / "gw", base_config=SMOL, max_upload_bytes=128 << 20, auth_cache_ttl_s=0,
                        max_concurrent_uploads=6, max_uploads_per_tenant=2, max_stored_bytes_per_tenant=0) as gw:
        keys = [gw.new_tenant(f"uploader-{i}") for i in range(5)]
        victim = gw.new_tenant("victim")
        latencies: list[float] = []
        statuses: list[int] = []
        stop = threading.Event()

        def probe() -> None:  # authenticated requests of another tenant: key lookup (no cache) + registry read
            with gw.client(victim, timeout=30) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    statuses.append(c.get("/v1/adapters").status_code)
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.02)

        thread = threading.Thread(target=probe)
        thread.start()
        time.sleep(2.0)
        baseline = list(latencies)
        procs = [upload_in_subprocess(gw.url, key, f"big-{j}", config, weights) for key in keys for j in range(2)]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        stop.set()
        thread.join()
    during = latencies[len(baseline):]
    codes = sorted(int(o.split()[0]) for o in outputs)
    p50, p95 = statistics.median(during), statistics.quantiles(during, n=20)[-1]
    print(f"uploads: {codes}; victim's requests: {len(during)} during, p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, max {max(during) * 1000:.0f} ms (before: p50 "
          f"{statistics.median(baseline) * 1000:.0f} ms)")
    assert set(codes) <= {201, 429} and codes.count(201) >= 6  # at most six at a time were admitted
    assert set(statuses) == {200}
    assert p95 < 0.5 and max(during) < 2.0
