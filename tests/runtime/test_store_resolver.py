"""The engine's store resolver and unload bookkeeping, without an engine (the real-engine test of a delete with
queued requests is tests/server/test_delete_queued_real_engine.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pytest

from flylora_runtime.format.checkpoint import TOMBSTONE_NAME
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from flylora_runtime.vllm_plugin import resolver as resolver_module
from flylora_runtime.vllm_plugin.resolver import StoreResolver, fail_requests_using

ID = "fl-" + "a" * 32


@pytest.fixture
def store(tmp_path, tiny_base):
    generate_adapter(tiny_base, GenerateSpec(r=8, top_k=2, seed=1)).save(tmp_path / ID)
    return tmp_path


def test_tombstoned_adapter_is_not_resolved(store, tiny_base):
    resolver = StoreResolver(str(store), tiny_base)
    assert resolver.path_for(ID) == str(store / ID)
    (store / ID / TOMBSTONE_NAME).touch()
    assert resolver.path_for(ID) is None
    for bad in ("../x", "fl-missing", ".."):
        assert resolver.path_for(bad) is None


def test_invalid_adapter_is_validated_once_until_its_files_change(store, tiny_base, monkeypatch):
    calls = []
    real = resolver_module.validate_dir
    monkeypatch.setattr(resolver_module, "validate_dir", lambda *a, **k: calls.append(1) or real(*a, **k))
    resolver = StoreResolver(str(store), tiny_base, max_rank=4)  # the adapter's r=8 is above the engine's max
    assert resolver._validate(ID, str(store / ID)) is False
    assert resolver._validate(ID, str(store / ID)) is False
    assert len(calls) == 1
    later = time.time() + 5
    os.utime(store / ID / "adapter_config.json", (later, later))  # replaced: validated again
    assert resolver._validate(ID, str(store / ID)) is False and len(calls) == 2
    assert StoreResolver(str(store), tiny_base, max_rank=32)._validate(ID, str(store / ID)) is True


def test_a_folder_with_an_engine_form_is_checked_for_structure_only(store, tiny_base, monkeypatch):
    """Its values were checked when the gateway stored it (and the engine checks the form's as it reads them):
    the resolver no longer reads the checkpoint's data, but still refuses a structure that does not fit."""
    from safetensors.torch import load_file, save_file

    from flylora_runtime.format import checkpoint
    from flylora_runtime.format.engine_form import ENGINE_FORM_NAME, write_engine_form

    folder = store / ID
    write_engine_form(folder / "adapter_model.safetensors", folder / ENGINE_FORM_NAME, 1.0)
    scans = []
    real_scan = checkpoint.check_values_and_hash
    monkeypatch.setattr(checkpoint, "check_values_and_hash", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    assert StoreResolver(str(store), tiny_base)._validate(ID, str(folder)) is True and scans == []
    os.utime(folder / ENGINE_FORM_NAME, ns=(0, 0))  # older than the checkpoint: not the gateway's, scanned again
    assert StoreResolver(str(store), tiny_base)._validate(ID, str(folder)) is True and scans == [1]
    write_engine_form(folder / "adapter_model.safetensors", folder / ENGINE_FORM_NAME, 1.0)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    os.utime(folder / ENGINE_FORM_NAME)
    assert StoreResolver(str(store), tiny_base)._validate(ID, str(folder)) is False and scans == [1]


def test_a_structure_validated_once_is_not_parsed_again(store, tiny_base, monkeypatch):
    """Folders with an engine form whose config, checkpoint header and size are byte for byte ones already found
    valid are not validated again (another adapter of the same shape: different values, same structure); any
    other structure is, and a bad one is still refused; without an engine form every folder is validated."""
    from safetensors.torch import load_file, save_file

    from flylora_runtime.format.engine_form import ENGINE_FORM_NAME, write_engine_form

    calls = []
    real = resolver_module.validate_dir
    monkeypatch.setattr(resolver_module, "validate_dir", lambda *a, **k: calls.append(k["check_values"]) or real(*a, **k))
    ids = [ID, "fl-" + "b" * 32, "fl-" + "c" * 32, "fl-" + "d" * 32]
    for seed, name in enumerate(ids[1:], start=2):
        generate_adapter(tiny_base, GenerateSpec(r=8, top_k=2, seed=seed)).save(store / name)
    for name in ids[:3]:
        write_engine_form(store / name / "adapter_model.safetensors", store / name / ENGINE_FORM_NAME, 1.0)
    resolver = StoreResolver(str(store), tiny_base)
    assert all(resolver._validate(name, str(store / name)) for name in ids[:2]) and calls == [False]
    tensors = load_file(store / ids[2] / "adapter_model.safetensors")  # same shape, a wrong structure
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, store / ids[2] / "adapter_model.safetensors")
    os.utime(store / ids[2] / ENGINE_FORM_NAME)
    assert resolver._validate(ids[2], str(store / ids[2])) is False and calls == [False, False]
    assert resolver._validate(ids[3], str(store / ids[3])) is True and calls == [False, False, True]  # no form
    assert resolver._validate(ids[3], str(store / ids[3])) is True and calls == [False, False, True, True]


# --- unload bookkeeping, on test doubles of vLLM's output processor ----------------------------------------

@dataclass
class _Lora:
    lora_name: str
    lora_int_id: int


class _Queue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


@dataclass
class _State:
    lora_request: _Lora | None
    queue: _Queue = field(default_factory=_Queue)

    @property
    def lora_name(self):
        return self.lora_request.lora_name if self.lora_request else None


class _ProcessorDouble:
    """A test double of vLLM's OutputProcessor: request states, and abort_requests as it behaves."""

    def __init__(self, states):
        self.request_states = dict(states)

    def abort_requests(self, ids, internal):
        assert internal
        for rid in ids:
            self.request_states[rid].queue.put("abort output")
            del self.request_states[rid]
        return list(ids)


def test_unload_fails_the_adapters_requests_and_refuses_late_ones():
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMNotFoundError

    doomed, other = _Lora(ID, 7), _Lora("fl-" + "b" * 32, 8)
    states = {"r1": _State(doomed), "r2": _State(other), "r3": _State(None), "r4": _State(_Lora(ID, 3))}
    queues = {rid: s.queue for rid, s in states.items()}
    processor = _ProcessorDouble(states)
    engine_client = type("Client", (), {"output_processor": processor})()
    ids = fail_requests_using(engine_client, ID, 7)
    assert sorted(ids) == ["r1", "r4"]  # by int id, and by name (an older load of the same adapter)
    assert sorted(processor.request_states) == ["r2", "r3"]
    for rid in ("r1", "r4"):
        error = queues[rid].items[-1]  # the error replaces the abort output
        assert isinstance(error, VLLMNotFoundError) and "does not exist" in str(error)
    assert queues["r2"].items == [] and 7 in processor._flylora_dead_lora_ids


def test_patched_add_request_refuses_an_unloaded_adapter():
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMNotFoundError
    from vllm.v1.engine.output_processor import OutputProcessor

    add_request = resolver_module.refuse_unloaded_adapters(OutputProcessor.add_request)
    processor = OutputProcessor.__new__(OutputProcessor)  # only the attribute the patch reads
    processor._flylora_dead_lora_ids = {7: None}
    request = type("Req", (), {"lora_request": _Lora(ID, 7)})()
    with pytest.raises(VLLMNotFoundError, match="does not exist"):
        add_request(processor, request, None)
