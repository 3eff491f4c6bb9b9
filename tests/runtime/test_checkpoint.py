"""Validation of adapter checkpoints: each failure has its own error type and names the key."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from flylora_runtime.format import errors
from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME, lora_keys, validate_dir, validate_files
from flylora_runtime.format.modelspec import BaseModelSpec

MODULE = "model.layers.1.self_attn.q_proj"
KA, KB, KD = lora_keys(MODULE)


def _edit_weights(adapter_dir, fn):
    path = adapter_dir / WEIGHTS_NAME
    state = load_file(path)
    fn(state)
    save_file(state, path)


def _edit_config(adapter_dir, fn):
    path = adapter_dir / CONFIG_NAME
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_valid_adapter_manifest(tiny_adapter_dir, tiny_base):
    m = validate_dir(tiny_adapter_dir, tiny_base)
    assert (m.config.r, m.config.top_k, m.config.is_flylora) == (8, 2, True)
    assert len(m.modules) == 2 * 7
    assert MODULE in m.modules
    assert m.weights_bytes == (tiny_adapter_dir / WEIGHTS_NAME).stat().st_size
    assert len(m.sha256) == 64


def test_plain_peft_lora_is_accepted_as_top_k_equals_r(tiny_adapter_dir, tiny_base):
    _edit_config(tiny_adapter_dir, lambda c: [c.pop(k) for k in ("top_k", "bias_u", "init_lora_weights")])
    _edit_weights(tiny_adapter_dir, lambda s: [s.pop(k) for k in list(s) if k.endswith("lora_topk_bias")])
    m = validate_dir(tiny_adapter_dir, tiny_base)
    assert (m.config.top_k, m.config.is_flylora) == (8, False)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_names_are_refused_unopened(tmp_path, tiny_base, suffix, monkeypatch):
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    bad = tmp_path / f"adapter_model{suffix}"
    bad.write_bytes(b"\x80\x04whatever")
    with pytest.raises(errors.UnsafeFormat, match="pickle") as info:
        validate_files(tmp_path / CONFIG_NAME, bad, tiny_base)
    assert info.value.file == bad.name
    assert str(bad) not in opened


def test_pickle_content_under_a_safetensors_name_is_refused_without_unpickling(tmp_path, tiny_adapter_dir, tiny_base):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tiny_adapter_dir / WEIGHTS_NAME).write_bytes(pickle.dumps(Evil(), protocol=4))
    with pytest.raises(errors.UnsafeFormat, match="pickle"):
        validate_dir(tiny_adapter_dir, tiny_base)
    assert not marker.exists()


def test_pickle_only_directory_is_refused(tmp_path, tiny_base):
    (tmp_path / CONFIG_NAME).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(errors.UnsafeFormat, match="adapter_model.bin"):
        validate_dir(tmp_path, tiny_base)


def test_missing_file(tiny_adapter_dir, tiny_base):
    (tiny_adapter_dir / CONFIG_NAME).unlink()
    with pytest.raises(errors.AdapterFileMissing, match=CONFIG_NAME):
        validate_dir(tiny_adapter_dir, tiny_base)


def test_too_large(tiny_adapter_dir, tiny_base):
    with pytest.raises(errors.AdapterTooLarge, match=r"expected at most 1000 bytes, found \d+"):
        validate_dir(tiny_adapter_dir, tiny_base, max_bytes=1000)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("top_k", 9, "expected 0 < top_k <= r = 8, found top_k = 9"),
        ("top_k", 0, "expected a positive integer, found 0"),
        ("r", "8", "expected a positive integer, found '8'"),
        ("lora_alpha", 0, "expected a finite number > 0, found 0"),
        ("lora_alpha", float("nan"), "expected a finite number > 0, found nan"),
        ("flylora_routing", "abs", "expected one of"),
        ("peft_type", "IA3", "expected peft_type 'LORA'"),
        ("use_dora", True, "use_dora"),
    ],
)
def test_invalid_config_values(tiny_adapter_dir, tiny_base, key, value, expected):
    _edit_config(tiny_adapter_dir, lambda c: c.__setitem__(key, value))
    with pytest.raises(errors.InvalidConfig, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == key and info.value.file == CONFIG_NAME


def test_config_not_json(tiny_adapter_dir, tiny_base):
    (tiny_adapter_dir / CONFIG_NAME).write_text("{not json")
    with pytest.raises(errors.InvalidConfig, match="JSON"):
        validate_dir(tiny_adapter_dir, tiny_base)


def test_unknown_target_module(tiny_adapter_dir, tiny_base):
    _edit_config(tiny_adapter_dir, lambda c: c["target_modules"].append("c_attn"))
    with pytest.raises(errors.UnknownTargetModule, match="'c_attn'") as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == "target_modules"


def test_tensor_of_a_module_the_base_lacks(tiny_adapter_dir, tiny_base):
    key = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    _edit_weights(tiny_adapter_dir, lambda s: s.__setitem__(key, torch.zeros(8, 64)))
    with pytest.raises(errors.UnknownTargetModule) as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == key


def test_missing_tensor(tiny_adapter_dir, tiny_base):
    _edit_weights(tiny_adapter_dir, lambda s: s.pop(KB))
    with pytest.raises(errors.MissingTensor, match=r"expected a tensor of shape \[64, 8\], found none") as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == KB


def test_missing_routing_bias_of_a_flylora_adapter(tiny_adapter_dir, tiny_base):
    _edit_weights(tiny_adapter_dir, lambda s: s.pop(KD))
    with pytest.raises(errors.MissingTensor) as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == KD


def test_unexpected_tensor(tiny_adapter_dir, tiny_base):
    key = f"base_model.model.{MODULE}.lora_B.bias"
    _edit_weights(tiny_adapter_dir, lambda s: s.__setitem__(key, torch.zeros(64)))
    with pytest.raises(errors.UnexpectedTensor, match=r"shape \[64\]") as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == key


def test_routing_bias_in_a_plain_lora_config(tiny_adapter_dir, tiny_base):
    _edit_config(tiny_adapter_dir, lambda c: c.pop("top_k"))
    with pytest.raises(errors.UnexpectedTensor, match="top_k"):
        validate_dir(tiny_adapter_dir, tiny_base)


@pytest.mark.parametrize("key, shape", [(KA, (8, 65)), (KB, (64, 4)), (KD, (7,))])
def test_shape_mismatch(tiny_adapter_dir, tiny_base, key, shape):
    _edit_weights(tiny_adapter_dir, lambda s: s.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(errors.ShapeMismatch, match=f"found {list(shape)}".replace("[", r"\[").replace("]", r"\]")) as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == key


def test_integer_dtype_refused(tiny_adapter_dir, tiny_base):
    _edit_weights(tiny_adapter_dir, lambda s: s.__setitem__(KA, torch.zeros(8, 64, dtype=torch.int32)))
    with pytest.raises(errors.DtypeNotAllowed, match="found I32") as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == KA


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tiny_adapter_dir, tiny_base, dtype, bad):
    def poison(s):
        t = s[KB].to(dtype)
        t[3, 5] = bad
        s[KB] = t

    _edit_weights(tiny_adapter_dir, poison)
    with pytest.raises(errors.NonFiniteValues, match="found 1 NaN/inf") as info:
        validate_dir(tiny_adapter_dir, tiny_base)
    assert info.value.key == KB


def test_half_precision_finite_values_pass(tiny_adapter_dir, tiny_base):
    _edit_weights(tiny_adapter_dir, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    assert validate_dir(tiny_adapter_dir, tiny_base).config.r == 8


@pytest.mark.parametrize("payload", [b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_malformed_safetensors(tiny_adapter_dir, tiny_base, payload):
    (tiny_adapter_dir / WEIGHTS_NAME).write_bytes(payload)
    with pytest.raises(errors.InvalidSafetensors):
        validate_dir(tiny_adapter_dir, tiny_base)


def test_out_of_range_offsets(tiny_adapter_dir, tiny_base):
    header = json.dumps({KA: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}}).encode()
    (tiny_adapter_dir / WEIGHTS_NAME).write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(errors.InvalidSafetensors, match="not fully covered"):
        validate_dir(tiny_adapter_dir, tiny_base)


def test_unsupported_base_architecture():
    with pytest.raises(errors.BaseModelMismatch, match="'gpt2'"):
        BaseModelSpec.from_hf_config({"model_type": "gpt2"})


def test_layers_to_transform_limits_expected_modules(tiny_adapter_dir, tiny_base):
    _edit_config(tiny_adapter_dir, lambda c: c.__setitem__("layers_to_transform", [1]))
    _edit_weights(tiny_adapter_dir, lambda s: [s.pop(k) for k in list(s) if ".layers.0." in k])
    m = validate_dir(tiny_adapter_dir, tiny_base)
    assert all(".layers.1." in mod for mod in m.modules) and len(m.modules) == 7
