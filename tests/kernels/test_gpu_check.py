"""``make gpu-check`` tested here on CPU: everything but the launch on a GPU (the report format, the bytes and
bandwidth arithmetic, the test runners, the CLI under ``TRITON_INTERPRET=1`` with tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flylora_runtime.bench import gpu_kernel as gk
from flylora_runtime.bench.gpu_check import SCHEMA, verdict
from flylora_runtime.bench.gpu_tests import REPO, ensure_safetensors, parse_junit, run_builtin, run_with_pytest

BENCH_KEYS = {"layer", "phase", "tokens", "adapters", "in", "outs", "r", "k", "slots", "dtype", "a_layout",
              "flylora_ms", "dense_lora_grouped_ms", "dense_lora_gathered_ms", "dense_lora_ms",
              "speedup_vs_dense_lora", "flylora_bytes", "dense_lora_bytes", "flylora_gbps",
              "flylora_fraction_of_peak", "flylora_fraction_of_copy", "dense_lora_gbps",
              "dense_lora_fraction_of_peak", "dense_lora_fraction_of_copy"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}


def test_flylora_bytes_by_hand() -> None:
    """Decode, 2 tokens on 2 adapters, qkv (64 -> 64+16+16), r=8 k=2, dense fp32 A, bf16 B and x: x and out rows,
    token_slot, and per adapter and slice all r rows of A, d, and k of B's rows (one token each)."""
    slots, _ = gk.build_layer(64, (64, 16, 16), 2, num_slots=4, r=8, k=2, dtype=torch.bfloat16, layout="dense",
                              device="cpu")
    ts = gk.token_slots(gk.Shape("decode", 2, 2), "cpu")
    per_adapter = 3 * (8 * 64 * 4 + 8 * 4) + 2 * (64 + 16 + 16) * 2
    assert gk.flylora_bytes(slots, ts, 2) == 2 * 64 * 2 + 2 * 2 * 96 * 2 + 2 * 4 + 2 * per_adapter


def test_flylora_bytes_compact_and_prefill_reuse() -> None:
    """Compact A reads p values and p indices per row; 8 tokens of one adapter need at most r rows of B."""
    slots, _ = gk.build_layer(96, (32,), 1, num_slots=2, r=8, k=2, dtype=torch.bfloat16, layout="compact",
                              device="cpu")
    p = 96 // (8 // 2)
    assert slots.a_val.shape[-1] == p
    ts = torch.zeros(8, dtype=torch.int32)
    a = 8 * p * (2 + 4) + 8 * 4  # bf16 values, int32 indices, fp32 d
    assert gk.flylora_bytes(slots, ts, 2) == 8 * 96 * 2 + 2 * 8 * 32 * 2 + 8 * 4 + a + min(8, 2 * 8) * 32 * 2
    none = torch.full((3,), -1, dtype=torch.int32)  # rows without an adapter move nothing but token_slot
    assert gk.flylora_bytes(slots, none, 2) == 3 * 4


def test_dense_lora_bytes_and_baseline_agree() -> None:
    ts = torch.tensor([0, 1, 1, -1], dtype=torch.int32)
    assert gk.lora_bytes(64, (32, 16), 8, ts, 2, 2) == 3 * 64 * 2 + 2 * 3 * 48 * 2 + 4 * 4 + 2 * (8 * 64 + 32 * 8 + 8 * 64 + 16 * 8) * 2
    _, adapters = gk.build_layer(64, (32, 16), 2, num_slots=2, r=8, k=8, dtype=torch.float32, layout="dense",
                                 device="cpu")
    base = gk.DenseLoRA(adapters, torch.float32, "cpu", ts)
    x = torch.randn(4, 64)
    a, b = torch.zeros(4, 48), torch.zeros(4, 48)
    base.grouped(a, x)
    base.gathered(b, x.clone())
    b[3] = 0  # the gathered form gives row -1 the last adapter's delta (it indexes with -1); rows without
    assert torch.allclose(a, b, atol=1e-5)  # an adapter are left to the grouped form, which skips them
    assert torch.equal(a[3], torch.zeros(48))


def test_bandwidth_fields() -> None:
    f = gk.bandwidth_fields("flylora", 3_000_000, 0.001, peak=4e12, copy_bw=None)  # 3 MB in 1 us
    assert f == {"flylora_gbps": 3000.0, "flylora_fraction_of_peak": 0.75, "flylora_fraction_of_copy": None}


def test_verdict() -> None:
    ok_tests = {"passed": 3, "failed": 0}
    exact = [{"bit_exact": True}, {"bit_exact": True}]
    assert verdict({"tests": ok_tests, "cuda_graph": exact, "benchmarks": []})["ok"] is True
    assert verdict({"tests": {"passed": 3, "failed": 1}, "cuda_graph": exact})["ok"] is False
    assert verdict({"tests": {"passed": 0, "failed": 0}, "cuda_graph": exact})["ok"] is False  # nothing ran
    assert verdict({"tests": ok_tests, "cuda_graph": [{"bit_exact": False}]})["cuda_graph_ok"] is False
    assert verdict({"tests": ok_tests, "cuda_graph": {"error": "x"}})["ok"] is False
    assert verdict({"tests": ok_tests, "cuda_graph": {"skipped": "cpu"}})["cuda_graph_ok"] is None
    assert verdict({"tests": ok_tests, "cuda_graph": exact, "benchmarks": {"error": "boom"}})["ok"] is False


SAMPLE_TESTS = textwrap.dedent('''
    import pytest

    @pytest.mark.parametrize("a", [1, 2])
    @pytest.mark.parametrize("b", [10, 20], ids=["ten", "twenty"])
    def test_grid(a, b):
        assert a * b != 40

    @pytest.mark.skipif(True, reason="never here")
    def test_skipped():
        raise AssertionError

    def test_skips_itself():
        pytest.skip("no")

    def test_raises():
        with pytest.raises(ValueError, match="bad"):
            raise ValueError("bad input")
''')


def test_builtin_runner_and_pytest_count_alike(tmp_path) -> None:
    """The stand-in runner (for machines without pytest) gives the counts pytest gives."""
    path = tmp_path / "test_sample.py"
    path.write_text(SAMPLE_TESTS)
    builtin = run_builtin(str(path))
    assert (builtin["passed"], builtin["failed"], builtin["skipped"]) == (4, 1, 2)
    assert builtin["failures"][0]["test"].endswith("test_grid[twenty-2]") and "AssertionError" in builtin["failures"][0]["message"]
    real = run_with_pytest(str(path), 120, None)
    assert (real["passed"], real["failed"], real["skipped"]) == (4, 1, 2)
    assert "pytest" in sys.modules and not getattr(sys.modules["pytest"], "__flylora_standin__", False)


def test_parse_junit() -> None:
    xml = ('<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
           '<failure message="boom">tb</failure></testcase><testcase classname="t" name="c"><skipped/></testcase>'
           '<testcase classname="t" name="d"><error message="setup"/></testcase></testsuite></testsuites>')
    got = parse_junit(xml)
    assert (got["passed"], got["failed"], got["skipped"], got["total"]) == (1, 2, 1, 4)
    assert [f["test"] for f in got["failures"]] == ["t::b", "t::d"]


def test_safetensors_standin(tmp_path, monkeypatch) -> None:
    assert ensure_safetensors(tmp_path / "unused") is None  # installed here: nothing written
    assert not (tmp_path / "unused").exists()
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = ensure_safetensors(tmp_path / "stub")
    code = "import safetensors.torch as st\ntry:\n    st.load_file('x')\nexcept ImportError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {folder!r})\n{code}"],
                         capture_output=True, text=True, check=True).stdout
    assert "safetensors is not installed" in out


def test_cli_self_test_on_cpu_writes_the_documented_report(tmp_path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "flylora_runtime.bench.gpu_check", "--device", "cpu",
                           "--runner", "builtin", "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert {"created", "command", "host", "versions", "device", "tests", "cuda_graph", "benchmarks", "verdict",
            "duration_s", "durations_s"} <= set(report)
    assert report["tests"]["runner"] == "builtin" and report["tests"]["failed"] == 0 and report["tests"]["passed"] >= 8
    assert report["cuda_graph"] == {"skipped": "no CUDA device: graph capture needs a GPU"}
    assert report["verdict"] == {"tests_ok": True, "cuda_graph_ok": None, "ok": True}
    rows = report["benchmarks"]
    assert len(rows) == 2 * len(gk.TINY_LAYERS) * len(gk.TINY_SHAPES)
    for row in rows:
        assert set(row) == BENCH_KEYS
        assert row["flylora_gbps"] == pytest.approx(row["flylora_bytes"] / (row["flylora_ms"] * 1e-3) / 1e9)
        assert row["flylora_fraction_of_peak"] is None  # no device bandwidth on CPU
    assert {r["a_layout"] for r in rows} == {"dense", "compact"} and {r["phase"] for r in rows} == {"decode", "prefill"}


def test_cli_without_a_gpu_says_so(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, "-m", "flylora_runtime.bench.gpu_check", "--out", str(tmp_path / "r.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device visible" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_make_gpu_check_needs_no_setup() -> None:
    """The target runs the system python directly (no venv, no vLLM): it must not depend on setup."""
    text = (REPO / "Makefile").read_text()
    rule = next(line for line in text.splitlines() if line.startswith("gpu-check:"))
    assert rule.strip() == "gpu-check:", rule
    assert "flylora_runtime.bench.gpu_check" in text.split("gpu-check:", 1)[1].split("\n\n", 1)[0]
    assert Path(REPO / "flylora_runtime/bench/gpu_check.py").is_file()
