"""Hostile uploads through the public API (real gateway over HTTP, the fake engine test double behind it): each
attack gets its 4xx in OpenAI's error shape (507 when the disk is full), leaves the registry and the store as
they were, and does not affect another tenant."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from server.settings import Settings

from tests.server.helpers import adapter_files, assert_openai_error, upload_form


def _state(gw):
    return gw.store_entries(), gw.gw.registry.all_internal_ids()


def _post(gw, key, name, config: bytes, weights: bytes) -> httpx.Response:
    data, files = upload_form(name, config, weights)
    with gw.client(key) as c:
        return c.post("/v1/adapters", data=data, files=files)


def _other_tenant_works(gw, tmp_path) -> None:
    _, key = gw.new_tenant()
    assert gw.upload(key, "unaffected", tmp_path / "unaffected").status_code == 201
    with gw.client(key) as c:
        assert [a["id"] for a in c.get("/v1/adapters").json()["data"]] == ["unaffected"]


def test_gateway_max_rank_default_matches_the_engines():
    from flylora_runtime.engine.launcher import EngineConfig

    assert Settings(_env_file=None).engine_max_lora_rank == EngineConfig().max_lora_rank


def test_rank_above_the_engines_max_is_refused_at_upload(gateway, tenant, tmp_path):
    _, key = tenant
    before = _state(gateway)
    err = assert_openai_error(gateway.upload(key, "too-wide", tmp_path / "a", r=64, top_k=4), 400)
    assert err["code"] == "adapter_not_servable" and err["param"] == "r"
    assert "r <= 32" in err["message"] and "found r = 64" in err["message"]
    assert _state(gateway) == before
    assert gateway.upload(key, "fits", tmp_path / "b", r=32, top_k=4).status_code == 201


@pytest.mark.parametrize("length", [0x0280, 0x0380, 0x0480, 0x0580])
def test_valid_file_whose_header_length_looks_like_a_pickle_marker_is_accepted(gateway, tenant, tmp_path, length):
    config, weights = adapter_files(tmp_path / "a", targets=("q_proj",), top_k=None)  # a header under 640 bytes
    raw = weights.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + hlen].rstrip(b" ")
    assert len(header) <= length
    crafted = struct.pack("<Q", length) + header + b" " * (length - len(header)) + raw[8 + hlen:]
    assert crafted[0] == 0x80 and 2 <= crafted[1] <= 5
    r = _post(gateway, tenant[1], "marker", config.read_bytes(), crafted)
    assert r.status_code == 201, r.text


CONFIG_BOMBS = {
    "deep_nesting": b"[" * 30_000 + b"]" * 30_000,
    "huge_integer": b'{"r": ' + b"9" * 5000 + b', "target_modules": ["q_proj"]}',
    "huge_alpha": b'{"r": 4, "lora_alpha": 1' + b"0" * 400 + b', "target_modules": ["q_proj"]}',
    "bool_for_list": b'{"r": 4, "top_k": 2, "target_modules": true}',
    "bool_layers": b'{"r": 4, "top_k": 2, "target_modules": ["q_proj"], "layers_to_transform": true}',
    "float_layers": b'{"r": 4, "top_k": 2, "target_modules": ["q_proj"], "layers_to_transform": 1.5}',
    "list_routing": b'{"r": 4, "top_k": 2, "target_modules": ["q_proj"], "flylora_routing": ["signed"]}',
    "regex_pattern": b'{"r": 4, "top_k": 2, "target_modules": ["q_proj"], "rank_pattern": {"(a+)+$": 8}}',
    "not_an_object": b"[1, 2, 3]",
    "invalid_utf8": b'{"r": 4, "target_modules": ["\xff"]}',
}


@pytest.mark.parametrize("case", sorted(CONFIG_BOMBS))
def test_malformed_config_json_is_400_never_500(gateway, tenant, tmp_path, case):
    _, weights = adapter_files(tmp_path / "a")
    before = _state(gateway)
    err = assert_openai_error(_post(gateway, tenant[1], "bomb", CONFIG_BOMBS[case], weights.read_bytes()), 400)
    assert err["code"] == "invalid_adapter" and "adapter_config.json" in err["message"]
    assert _state(gateway) == before


def _header_file(header: bytes, data: bytes = b"\0" * 4) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


HEADER_BOMBS = {
    "deep_nesting": _header_file(b'{"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    "huge_integer": _header_file(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'),
    "bool_for_list": _header_file(b'{"x": {"dtype": "F32", "shape": true, "data_offsets": [0, 4]}}'),
    "tiny_objects": _header_file(b"{" + b",".join(b'"k%d": {}' % i for i in range(4000)) + b"}"),
    "claims_100_mb": struct.pack("<Q", 100_000_000) + b"{" + b"\0" * 200_000,
    "array_top_level": _header_file(b"[]"),
}


@pytest.mark.parametrize("case", sorted(HEADER_BOMBS))
def test_malformed_safetensors_header_is_400_never_500(make_engine, make_gateway, tenant, tmp_path, case):
    gw = make_gateway([make_engine().url], max_upload_bytes=1 << 20)
    _, key = gw.new_tenant()
    config, _ = adapter_files(tmp_path / "a")
    before = _state(gw)
    err = assert_openai_error(_post(gw, key, "bomb", config.read_bytes(), HEADER_BOMBS[case]), 400)
    assert err["code"] == "invalid_adapter" and "safetensors" in err["message"]
    assert len(err["message"]) < 1000
    assert _state(gw) == before
    _other_tenant_works(gw, tmp_path)


def test_adapter_count_quota(make_engine, make_gateway, tmp_path):
    gw = make_gateway([make_engine().url], max_adapters_per_tenant=2)
    _, key = gw.new_tenant()
    assert gw.upload(key, "one", tmp_path / "1").status_code == 201
    assert gw.upload(key, "two", tmp_path / "2").status_code == 201
    before = _state(gw)
    err = assert_openai_error(gw.upload(key, "three", tmp_path / "3"), 403)
    assert err["code"] == "adapter_quota_exceeded" and "at most 2 adapters" in err["message"]
    assert _state(gw) == before
    _other_tenant_works(gw, tmp_path)  # the quota is per tenant
    with gw.client(key) as c:
        assert c.delete("/v1/adapters/one").status_code == 204
    assert gw.upload(key, "three", tmp_path / "3").status_code == 201


def test_stored_bytes_quota(make_engine, make_gateway, tmp_path):
    config, weights = adapter_files(tmp_path / "probe")
    size = weights.stat().st_size
    gw = make_gateway([make_engine().url], max_stored_bytes_per_tenant=int(size * 2.5))
    _, key = gw.new_tenant()
    assert gw.upload(key, "one", tmp_path / "1").status_code == 201
    assert gw.upload(key, "two", tmp_path / "2").status_code == 201
    before = _state(gw)
    err = assert_openai_error(gw.upload(key, "three", tmp_path / "3"), 403)
    assert err["code"] == "adapter_quota_exceeded" and err["param"] == "weights"
    assert _state(gw) == before
    _other_tenant_works(gw, tmp_path)


def test_upload_is_refused_when_the_store_disk_is_nearly_full(make_engine, make_gateway, tmp_path):
    gw = make_gateway([make_engine().url], min_free_store_bytes=1 << 62)  # more than any disk has free
    _, key = gw.new_tenant()
    before = _state(gw)
    err = assert_openai_error(gw.upload(key, "x", tmp_path / "a"), 507)
    assert err["code"] == "insufficient_storage" and err["type"] == "server_error"
    assert _state(gw) == before


class _SlowBody:
    """A multipart upload body sent slowly (chunked, no Content-Length): keeps an upload in progress."""

    def __init__(self, config: bytes, weights: bytes, name: str, release: threading.Event):
        boundary = "slowbound"
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self.head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
                     f"--{boundary}\r\nContent-Disposition: form-data; name=\"config\"; filename=\"c.json\"\r\n\r\n"
                     ).encode() + config + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w.safetensors\"\r\n\r\n"
        ).encode()
        self.weights = weights
        self.tail = f"\r\n--{boundary}--\r\n".encode()
        self.release = release
        self.started = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        yield self.weights[:100]
        self.started.set()
        self.release.wait(30)
        yield self.weights[100:]
        yield self.tail


def _slow_upload(gw, key, name, tmp_path, release) -> tuple[threading.Thread, dict, _SlowBody]:
    config, weights = adapter_files(tmp_path / name)
    body = _SlowBody(config.read_bytes(), weights.read_bytes(), name, release)
    out: dict = {}

    def send() -> None:
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=60) as c:
            out["response"] = c.post("/v1/adapters", content=iter(body), headers={"content-type": body.content_type})

    thread = threading.Thread(target=send)
    thread.start()
    assert body.started.wait(10)
    return thread, out, body


def test_concurrent_uploads_are_capped_per_tenant_and_in_all(make_engine, make_gateway, tmp_path):
    gw = make_gateway([make_engine().url], max_uploads_per_tenant=2, max_concurrent_uploads=3)
    (_, k1), (_, k2), (_, k3) = gw.new_tenant(), gw.new_tenant(), gw.new_tenant()
    release = threading.Event()
    held = []
    try:
        held += [_slow_upload(gw, k1, f"slow-{i}", tmp_path, release) for i in range(2)]
        time.sleep(0.2)
        before = _state(gw)
        err = assert_openai_error(gw.upload(k1, "third", tmp_path / "t"), 429)  # this tenant's cap
        assert err["code"] == "too_many_uploads" and err["type"] == "rate_limit_error"
        assert _state(gw) == before
        held.append(_slow_upload(gw, k2, "slow-other", tmp_path, release))  # another tenant still may
        time.sleep(0.2)
        before = _state(gw)
        with gw.client(k3) as c:
            r = c.post("/v1/adapters", data={"name": "x"}, files={"config": b"{}", "weights": b"x"})
        assert_openai_error(r, 429)  # the global cap
        assert r.headers["retry-after"] and _state(gw) == before
        with gw.client(k3) as c:  # requests other than uploads are not held up meanwhile
            assert c.get("/v1/adapters").status_code == 200
    finally:
        release.set()
        for thread, _, _ in held:
            thread.join(30)
    for _, out, _ in held:
        assert out["response"].status_code == 201, out["response"].text
    assert gw.upload(k1, "third", tmp_path / "t").status_code == 201  # slots are given back
