"""Hostile adapter files: every one is refused with its adapter error (never another exception), within a
bounded header read; valid files that only look odd (a header length starting 0x80 0x02) are accepted."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from flylora_runtime.format import errors
from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME, lora_keys, validate_dir
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.header import header_limit, read_header

MODULE = "model.layers.0.self_attn.q_proj"


def _small_adapter(folder, *, r=4, top_k=2):
    """One module (layer 0 q_proj): a header of ~300 bytes, so its length can be padded to any value."""
    folder.mkdir(parents=True, exist_ok=True)
    ka, kb, kd = lora_keys(MODULE)
    rng = np.random.default_rng(0)
    tensors = {ka: rng.standard_normal((r, 64)).astype(np.float32), kb: rng.standard_normal((64, r)).astype(np.float32),
               kd: np.zeros(r, np.float32)}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    config = {"peft_type": "LORA", "r": r, "top_k": top_k, "lora_alpha": 2 * r, "target_modules": ["q_proj"],
              "layers_to_transform": [0]}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def _rewrite_header(path, header: bytes, data: bytes | None = None):
    """Replace a safetensors file's header (keeping its data section unless ``data`` is given)."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    body = raw[8 + hlen:] if data is None else data
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


@pytest.mark.parametrize("length", [0x0280, 0x0380, 0x0480, 0x0580])
def test_header_length_that_starts_like_a_pickle_marker_is_accepted(tmp_path, tiny_base, length):
    folder = _small_adapter(tmp_path / "a")
    weights = folder / WEIGHTS_NAME
    raw = weights.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + hlen].rstrip(b" ")
    _rewrite_header(weights, header + b" " * (length - len(header)))  # writers pad with spaces, as here
    assert weights.read_bytes()[:2] == bytes([0x80, length >> 8])  # what a pickle of protocol 2..5 starts with
    manifest = validate_dir(folder, tiny_base)
    assert manifest.modules == (MODULE,)


def test_a_real_pickle_is_still_refused_whatever_its_name(tmp_path, tiny_base):
    import pickle

    folder = _small_adapter(tmp_path / "a")
    (folder / WEIGHTS_NAME).write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(errors.UnsafeFormat):
        validate_dir(folder, tiny_base)


def test_header_longer_than_the_derived_bound_is_refused_from_its_length(tmp_path, tiny_base):
    folder = _small_adapter(tmp_path / "a")
    limit = header_limit(tiny_base.max_adapter_tensors() + 64)
    # A 100 MB header of tiny objects: refused from the 8-byte length, the header itself is never read.
    with open(folder / WEIGHTS_NAME, "wb") as fh:
        fh.write(struct.pack("<Q", 100_000_000) + b"{")
        fh.truncate(8 + 100_000_000)
    with pytest.raises(errors.InvalidSafetensors, match=f"at most {limit} bytes"):
        validate_dir(folder, tiny_base)


def test_bound_is_small_for_real_models():
    from flylora_runtime.format.modelspec import LLAMA_3_1_8B

    assert header_limit(LLAMA_3_1_8B.max_adapter_tensors()) < 256 * 1024


@pytest.mark.parametrize("header", [
    b'{"x": ' + b"[" * 20000 + b"]" * 20000 + b"}",                                      # deep nesting
    b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',  # a 5,000-digit integer
    b'{"x": {"dtype": "F32", "shape": true, "data_offsets": [0, 4]}}',                   # a boolean for a list
    b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "shape": [1]}}',      # a duplicate field
    b'{"__metadata__": {"format": ["pt"]}}',                                              # metadata not strings
    b'{"x": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}',  # numel overflows
    b'{' + b",".join(b'"k%d": {}' % i for i in range(3000)) + b"}",                      # many tiny objects
    b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} trailing',
])
def test_malformed_headers_are_invalid_safetensors(tmp_path, tiny_base, header):
    folder = _small_adapter(tmp_path / "a")
    _rewrite_header(folder / WEIGHTS_NAME, header, data=b"\0" * 4)
    with pytest.raises(errors.InvalidSafetensors):
        validate_dir(folder, tiny_base)


def test_too_many_tensors_are_refused_before_their_shapes_are_read(tmp_path):
    path = tmp_path / WEIGHTS_NAME
    save_file({f"t{i}": np.zeros(1, np.float32) for i in range(50)}, str(path))
    with pytest.raises(errors.InvalidSafetensors, match="at most 10 tensors, found 50"):
        read_header(path, max_tensors=10)


def test_offsets_are_derived_from_the_validated_layout(tmp_path):
    path = tmp_path / WEIGHTS_NAME
    save_file({"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, np.float16)}, str(path))
    tensors = read_header(path)
    raw = path.read_bytes()
    for key, info in tensors.items():
        dtype = np.float32 if info.dtype == "F32" else np.float16
        values = np.frombuffer(raw[info.start:info.end], dtype=dtype)
        assert values.size == int(np.prod(info.shape))
    assert np.array_equal(np.frombuffer(raw[tensors["b"].start:tensors["b"].end], np.float32), np.arange(6))


@pytest.mark.parametrize("text", [
    "[" * 30_000 + "]" * 30_000,                                     # RecursionError in json (60 KB)
    '{"r": ' + "9" * 5000 + "}",                                    # past Python's int digit limit
    '{"r": 4, "lora_alpha": 1' + "0" * 400 + ', "target_modules": ["q_proj"]}',  # finite test would overflow
    '{"r": 4, "target_modules": true}',
    '{"r": 4, "target_modules": ["q_proj"], "layers_to_transform": true}',
    '{"r": 4, "target_modules": ["q_proj"], "layers_to_transform": 1.5}',
    '{"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [true]}',
    '{"r": 4, "target_modules": ["q_proj"], "layers_to_transform": {"0": 1}}',
    '{"r": 4, "target_modules": ["q_proj"], "flylora_routing": ["signed"]}',
    '{"r": 4, "target_modules": ["q_proj"], "peft_type": {"a": 1}}',
    '{"r": 4, "target_modules": ["q_proj"], "rank_pattern": {"(a+)+$": 8}}',
    '{"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}',
    '{"r": 4, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}',
    '{"r": 4, "target_modules": ["q_proj"], "init_lora_weights": [1]}',
    '{"r": 99999, "target_modules": ["q_proj"]}',
    "\"\\ud800\"",
    "\xff",
])
def test_malformed_configs_are_invalid_config(tmp_path, tiny_base, text):
    folder = _small_adapter(tmp_path / "a")
    (folder / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogatepass") if text != "\xff" else b"\xff")
    with pytest.raises(errors.InvalidConfig):
        validate_dir(folder, tiny_base)


def test_rank_above_the_engine_max_is_refused(tmp_path, tiny_base):
    folder = _small_adapter(tmp_path / "a", r=64, top_k=4)
    assert validate_dir(folder, tiny_base).config.r == 64
    with pytest.raises(errors.EngineLimitExceeded, match="r <= 32") as info:
        validate_dir(folder, tiny_base, max_rank=32)
    assert info.value.key == "r"


def test_canonical_config_round_trips_and_drops_unvalidated_fields(tiny_base):
    raw = {"peft_type": "LORA", "r": 8, "top_k": 2, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"],
           "layers_to_transform": [1, 0], "flylora_routing": "magnitude", "custom": {"anything": [1, 2]},
           "lora_dropout": 0.1, "init_lora_weights": "sparse"}
    config = FlyLoRAConfig.from_dict(raw)
    canonical = config.canonical_dict()
    assert "custom" not in canonical and canonical["lora_dropout"] == 0.0
    again = FlyLoRAConfig.from_dict(json.loads(json.dumps(canonical)))
    assert again == config and again.layers == (0, 1)


def test_non_finite_values_are_found_across_chunk_boundaries(tmp_path, tiny_base, monkeypatch):
    from flylora_runtime.format import checkpoint

    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", 24)  # a chunk ends inside tensors, never inside a value
    folder = _small_adapter(tmp_path / "a")
    manifest = validate_dir(folder, tiny_base)
    assert manifest.sha256 == checkpoint.sha256_file(folder / WEIGHTS_NAME)
    ka, kb, _ = lora_keys(MODULE)
    tensors = {ka: np.zeros((4, 64), np.float32), kb: np.zeros((64, 4), np.float32), lora_keys(MODULE)[2]:
               np.zeros(4, np.float32)}
    tensors[kb][63, 3] = np.inf  # the very last value of B
    save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.raises(errors.NonFiniteValues, match="found 1 NaN/inf") as info:
        validate_dir(folder, tiny_base)
    assert info.value.key == kb
