"""The engine form (flylora_runtime.format.engine_form): bit for bit what a bf16 engine makes of the checkpoint,
written without torch, and never used unless every check holds."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from flylora_runtime.format.checkpoint import WEIGHTS_NAME
from flylora_runtime.vllm_plugin.loading import read_checkpoint
from flylora_runtime.format.engine_form import ENGINE_FORM_NAME, _bfloat16_bits, write_engine_form
from flylora_runtime.weights.engine_form import read_engine_form


SCALING = 2.0 / 3.0  # not a power of two: folding it into B rounds


def _write_form(folder, scaling: float = SCALING) -> str:
    path = os.path.join(folder, ENGINE_FORM_NAME)
    write_engine_form(os.path.join(folder, WEIGHTS_NAME), path, scaling)
    return path


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy()


def test_rounding_to_bfloat16_is_torchs_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-90, 87, 200_000))).astype(np.float32)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1e-45, -1e-45, 1e-39, 0.0, -0.0, 3.38e38], np.float32)
    x = np.concatenate([x, ties])
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(_bfloat16_bits(x), expected)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
@pytest.mark.parametrize("scaling", [SCALING, 1.0, 2.0, 1 / 7])
def test_engine_form_holds_what_a_bf16_engine_makes_of_the_checkpoint(tiny_adapter_dir, dtype, scaling):
    weights = tiny_adapter_dir / WEIGHTS_NAME
    source = {k: v.to(getattr(torch, dtype)) for k, v in load_file(weights).items()}
    from safetensors.torch import save_file

    save_file(source, weights)
    _write_form(tiny_adapter_dir, scaling)
    config, got, folded = read_checkpoint(str(tiny_adapter_dir), torch.bfloat16, scaling)
    assert folded and config.top_k == 2 and sorted(got) == sorted(source)
    for key, t in source.items():
        # what vLLM's loader does: A and B .to(bf16), then B *= scaling in place; ours: the bias .to(fp32)
        want = t.to(torch.float32) if key.endswith("_bias") else t.to(torch.bfloat16)
        if key.endswith("lora_B.weight") and scaling != 1:
            want *= scaling
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert np.array_equal(_bits(got[key]), _bits(want)), key
        if key.endswith("lora_B.weight"):  # a view of the contiguous B^T the slot write copies as it is
            assert got[key].T.is_contiguous()


def test_fp32_engines_and_folders_without_the_form_read_the_checkpoint(tiny_adapter_dir):
    _, plain, folded = read_checkpoint(str(tiny_adapter_dir), torch.bfloat16, SCALING)  # no engine form yet
    assert not folded and all(t.dtype == torch.float32 for t in plain.values())
    _write_form(tiny_adapter_dir)
    _, fp32, folded = read_checkpoint(str(tiny_adapter_dir), torch.float32, SCALING)
    assert not folded and all(t.dtype == torch.float32 for t in fp32.values())
    _, bf16, folded = read_checkpoint(str(tiny_adapter_dir), torch.bfloat16, SCALING)
    assert folded and any(t.dtype == torch.bfloat16 for t in bf16.values())


def test_a_form_made_for_another_scaling_is_not_used(tiny_adapter_dir, caplog):
    _write_form(tiny_adapter_dir, 2.0)
    with caplog.at_level("WARNING"):
        _, tensors, folded = read_checkpoint(str(tiny_adapter_dir), torch.bfloat16, SCALING)
    assert not folded and all(t.dtype == torch.float32 for t in tensors.values())
    assert "made for scaling 2.0" in caplog.text


def _rewrite_header(path: str, edit) -> None:
    raw = open(path, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (hlen - len(new))
    assert len(new) == hlen
    open(path, "wb").write(raw[:8] + new + raw[8 + hlen:])


def _nan_in_a(path: str) -> None:
    raw = bytearray(open(path, "rb").read())
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    key = next(k for k in header if k.endswith("lora_A.weight"))
    at = 8 + hlen + header[key]["data_offsets"][0]
    raw[at:at + 2] = struct.pack("<H", 0x7FC0)
    open(path, "wb").write(bytes(raw))


def _damage(kind: str, folder) -> None:
    path = os.path.join(folder, ENGINE_FORM_NAME)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if kind == "older than the checkpoint":
        os.utime(path, ns=(0, 0))
    elif kind == "another checkpoint's size":
        with open(weights, "ab") as fh:  # not a valid checkpoint any more, but the form must be refused first
            fh.write(b"x")
        os.utime(path, ns=(os.stat(weights).st_mtime_ns + 1,) * 2)
    elif kind == "truncated":
        os.truncate(path, os.path.getsize(path) - 2)
    elif kind == "a NaN":
        _nan_in_a(path)
    elif kind == "another format":
        _rewrite_header(path, lambda h: h["__metadata__"].update(format="flylora-engine-bf16/9"))
    elif kind == "a missing tensor":
        _rewrite_header(path, lambda h: h.pop(next(k for k in h if k.endswith("lora_topk_bias"))))
    elif kind == "a wrong shape":
        def swap(h):
            key = next(k for k in h if k.endswith("lora_B_T.weight"))
            h[key]["shape"] = h[key]["shape"][::-1]
        _rewrite_header(path, swap)
    elif kind == "overlapping tensors":
        def overlap(h):
            key = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            h[key]["data_offsets"][0] -= 2
        _rewrite_header(path, overlap)
    elif kind == "garbage":
        open(path, "wb").write(struct.pack("<Q", 1 << 40) + b"{}")


@pytest.mark.parametrize("kind", ["older than the checkpoint", "another checkpoint's size", "truncated", "a NaN",
                                  "another format", "a missing tensor", "a wrong shape", "overlapping tensors",
                                  "garbage"])
def test_a_form_that_fails_any_check_is_not_used(tiny_adapter_dir, kind, caplog):
    _write_form(tiny_adapter_dir)
    assert read_engine_form(str(tiny_adapter_dir)) is not None
    _damage(kind, tiny_adapter_dir)
    with caplog.at_level("WARNING", logger="flylora.engine_form"):
        assert read_engine_form(str(tiny_adapter_dir)) is None
    assert "engine form" in caplog.text and "not used" in caplog.text
    if kind != "another checkpoint's size":
        _, tensors, folded = read_checkpoint(str(tiny_adapter_dir), torch.bfloat16, SCALING)  # the checkpoint
        assert not folded and all(t.dtype == torch.float32 for t in tensors.values())


def test_values_beyond_bfloat16s_range_leave_no_form(tmp_path):
    save_numpy({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full((2, 4), 3.4e38, np.float32),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((4, 2), np.float32)},
               str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="not finite in bfloat16"):
        write_engine_form(tmp_path / WEIGHTS_NAME, tmp_path / ENGINE_FORM_NAME, 1.0)
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_NAME]


def test_writing_the_form_imports_no_torch(tiny_adapter_dir, tmp_path):
    """The gateway writes it, and the gateway never imports torch."""
    code = ("import sys; from flylora_runtime.format.engine_form import write_engine_form; "
            f"write_engine_form({str(tiny_adapter_dir / WEIGHTS_NAME)!r}, {str(tmp_path / 'form')!r}, 2.0); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert os.path.getsize(tmp_path / "form") > 0


@pytest.mark.parametrize("mapper", ["none", "rename"])
def test_our_lora_model_is_vllms_and_names_are_parsed_once_per_mapper(tiny_adapter_dir, monkeypatch, mapper):
    """The plugin builds vLLM's LoRAModel itself (each tensor name parsed once per model, not twice per load):
    the same modules, A and B tensors, rank, alpha and scaling as vLLM's ``from_lora_tensors``. Names are
    cached by the mapper's rules, so the new mapper object vLLM makes for every load
    (``get_rename_mapper``) still hits the cache; a mapper with other rules does not."""
    pytest.importorskip("vllm")
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    import vllm.lora.utils as vllm_lora_utils
    from vllm.model_executor.models.utils import WeightsMapper

    from flylora_runtime.vllm_plugin import loading

    make = (lambda: None) if mapper == "none" else (
        lambda: WeightsMapper(orig_to_new_prefix={"base_model.model.model.": "base_model.model.model."}))
    tensors = {k: v for k, v in load_file(os.path.join(tiny_adapter_dir, WEIGHTS_NAME)).items()
               if not k.endswith(".lora_topk_bias")}
    with open(os.path.join(tiny_adapter_dir, "adapter_config.json")) as fh:
        peft = PEFTHelper.from_dict(json.load(fh))
    want = LoRAModel.from_lora_tensors(7, dict(tensors), peft, device="cpu", dtype=torch.bfloat16,
                                       weights_mapper=make())
    calls = []
    real_parse = vllm_lora_utils.parse_fine_tuned_lora_name
    monkeypatch.setattr(vllm_lora_utils, "parse_fine_tuned_lora_name",
                        lambda *a, **k: calls.append(a[0]) or real_parse(*a, **k))
    monkeypatch.setattr(loading, "_MODULE_NAMES", {})
    got = None
    for _ in range(2):  # a new, equal mapper object each time, as vLLM hands one to every load
        m = make()
        got = loading._lora_model(LoRAModel, 7, dict(tensors), peft, "cpu", torch.bfloat16, m,
                                  loading.mapper_fingerprint(m))
    assert len(calls) == len(tensors)  # parsed at the first load only
    assert got is not None and sorted(got.loras) == sorted(want.loras) and got.rank == want.rank
    for name, w in want.loras.items():
        g = got.loras[name]
        assert (g.rank, g.lora_alpha, g.scaling) == (w.rank, w.lora_alpha, w.scaling)
        assert torch.equal(g.lora_a, w.lora_a) and torch.equal(g.lora_b, w.lora_b)
        assert g.lora_a.dtype == w.lora_a.dtype == torch.bfloat16
    other = WeightsMapper(orig_to_new_prefix={"base_model.model.": "base_model.model."})
    loading._parsed_name(next(iter(tensors)), other, loading.mapper_fingerprint(other))
    assert len(calls) == len(tensors) + 1  # other rules: parsed again


def test_a_second_form_with_the_same_headers_skips_the_header_checks_but_not_the_values(tiny_adapter_dir, tmp_path,
                                                                                         monkeypatch):
    """Adapters of one shape have byte-identical headers: the second one's read reuses the first one's checked
    layout (no JSON parse, no walk over the entries), gets its own tensors, and still has its values checked."""
    import shutil

    from flylora_runtime.weights import engine_form as reader

    monkeypatch.setattr(reader, "_LAYOUTS", type(reader._LAYOUTS)())
    walks = []
    real_layout = reader._layout
    monkeypatch.setattr(reader, "_layout", lambda *a: walks.append(1) or real_layout(*a))
    _write_form(tiny_adapter_dir)
    other = tmp_path / "other"
    shutil.copytree(tiny_adapter_dir, other)
    path = os.path.join(other, ENGINE_FORM_NAME)
    first, _ = read_engine_form(str(tiny_adapter_dir))
    with open(path, "r+b") as fh:  # other values, the same headers
        (hlen,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + hlen)
        fh.write(np.full(2, 1.5, np.float32).tobytes())  # finite whether the first tensor is fp32 or bf16
    os.utime(path)
    second, _ = read_engine_form(str(other))
    assert len(walks) == 1 and len(reader._LAYOUTS) == 1
    assert sorted(first) == sorted(second)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    with open(path, "r+b") as fh:
        fh.seek(8 + hlen)
        fh.write(np.full(1, np.nan, np.float32).tobytes())  # a NaN in fp32, and in bf16 (its high half)
    os.utime(path)
    assert read_engine_form(str(other)) is None
    assert len(walks) == 1
