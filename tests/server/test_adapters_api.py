"""POST/GET/DELETE /v1/adapters: uploads are validated, stored atomically, registered; every bad upload
is refused with its status and an OpenAI-shaped error, leaving the registry and the store unchanged."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.server.helpers import (
    OTHER_BASE_CONFIG,
    PICKLE_BYTES,
    adapter_files,
    assert_openai_error,
    raw_request,
    upload_form,
)


def _snapshot(gateway, key):
    with gateway.client(key) as c:
        listed = c.get("/v1/adapters").json()["data"]
    rows = gateway.gw.registry.all_internal_ids()
    return gateway.store_entries(), rows, listed


def _post(gateway, key, name, config: bytes, weights: bytes, weights_filename="adapter_model.safetensors"):
    data, files = upload_form(name, config, weights, weights_filename=weights_filename)
    with gateway.client(key) as c:
        return c.post("/v1/adapters", data=data, files=files)


def test_upload_registers_and_stores_atomically(gateway, tenant, tmp_path):
    _, key = tenant
    before = gateway.store_entries()
    r = gateway.upload(key, "support", tmp_path / "a", r=4, top_k=2)
    assert r.status_code == 201, r.text
    adapter = r.json()
    config_bytes, weights_bytes = (tmp_path / "a" / "adapter_config.json").read_bytes(), \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert adapter["id"] == "support" and adapter["object"] == "adapter"
    assert (adapter["r"], adapter["top_k"], adapter["routing"]) == (4, 2, "signed")
    assert adapter["base_model"] == "SmolLM2-135M-Instruct" and adapter["status"] == "ready"
    assert adapter["bytes"] == len(weights_bytes)
    assert "fl-" not in json.dumps(adapter)  # the internal id is never shown
    new = gateway.store_entries() - before
    assert len(new) == 1
    internal = new.pop()
    assert re.fullmatch(r"fl-[0-9a-f]{32}", internal)
    folder = gateway.settings.store_dir / internal
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "flylora_engine.bf16.safetensors"]
    assert (folder / "adapter_model.safetensors").read_bytes() == weights_bytes
    # ... and its engine form, written from the validated weights, which a bf16 engine accepts
    from flylora_runtime.format.header import read_header
    from flylora_runtime.weights.engine_form import read_engine_form

    tensors, scaling = read_engine_form(str(folder))
    assert sorted(tensors) == sorted(read_header(folder / "adapter_model.safetensors")) and scaling == 8 / 4
    # The stored config is the validated one in canonical form (what the engine reads is what was checked).
    from flylora_runtime.format.config import FlyLoRAConfig

    stored = json.loads((folder / "adapter_config.json").read_text())
    assert FlyLoRAConfig.from_dict(stored) == FlyLoRAConfig.from_json_bytes(config_bytes)
    assert stored == FlyLoRAConfig.from_json_bytes(config_bytes).canonical_dict()
    assert not [e for e in gateway.store_entries() if e.startswith(".")]  # no staging left behind
    with gateway.client(key) as c:
        assert c.get("/v1/adapters/support").json() == adapter
        assert c.get("/v1/adapters").json() == {"object": "list", "data": [adapter], "has_more": False,
                                                "first_id": "support", "last_id": "support"}


def test_without_engine_form_the_store_holds_the_two_files(engine, make_gateway, tmp_path):
    gateway = make_gateway([engine.url], engine_form=False)
    r = gateway.upload(gateway.new_tenant()[1], "plain-store", tmp_path / "a", r=4, top_k=2)
    assert r.status_code == 201, r.text
    (internal,) = gateway.store_entries()
    assert sorted(p.name for p in (gateway.settings.store_dir / internal).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_adapters_stored_without_engine_form_get_one_at_the_next_start(engine, make_gateway, tmp_path):
    """Adapters uploaded while forms were off (or before they existed) get theirs when a gateway that writes
    them starts, except one whose weights no longer match what was uploaded (never a form of damaged files)."""
    from flylora_runtime.weights.engine_form import read_engine_form

    data = tmp_path / "data"
    first = make_gateway([engine.url], data_dir=data, engine_form=False)
    key = first.new_tenant()[1]
    for name in ("old-a", "old-b"):
        assert first.upload(key, name, tmp_path / name, r=4, top_k=2).status_code == 201
    folders = {n: first.settings.store_dir / first.gw.registry.get_adapter(1, n).internal_id for n in ("old-a", "old-b")}
    weights = folders["old-a"] / "adapter_model.safetensors"  # damaged: looked at first (by name)
    damaged = bytearray(weights.read_bytes())
    damaged[-2] ^= 1
    weights.write_bytes(bytes(damaged))
    assert not any((f / "flylora_engine.bf16.safetensors").exists() for f in folders.values())
    make_gateway([engine.url], data_dir=data)  # engine_form on, the default
    deadline = time.monotonic() + 20
    while not (folders["old-b"] / "flylora_engine.bf16.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_engine_form(str(folders["old-b"])) is not None
    assert not (folders["old-a"] / "flylora_engine.bf16.safetensors").exists()


def test_plain_peft_lora_is_accepted_as_top_k_equal_r(gateway, tenant, tmp_path):
    r = gateway.upload(tenant[1], "plain", tmp_path / "p", r=4, top_k=None)
    assert r.status_code == 201, r.text
    assert (r.json()["r"], r.json()["top_k"]) == (4, 4)


def test_duplicate_name_is_409_and_changes_nothing(gateway, tenant, tmp_path):
    _, key = tenant
    assert gateway.upload(key, "dup", tmp_path / "a").status_code == 201
    before = _snapshot(gateway, key)
    err = assert_openai_error(gateway.upload(key, "dup", tmp_path / "b", seed=1), 409)
    assert err["code"] == "adapter_exists"
    assert _snapshot(gateway, key) == before


def test_two_tenants_may_use_the_same_name(gateway, tmp_path):
    (_, k1), (_, k2) = gateway.new_tenant(), gateway.new_tenant()
    assert gateway.upload(k1, "same", tmp_path / "a").status_code == 201
    assert gateway.upload(k2, "same", tmp_path / "b").status_code == 201


@pytest.mark.parametrize("case", ["nan", "wrong_shape", "other_base", "pickle_name", "pickle_content",
                                  "bad_config_json", "top_k_above_r", "not_safetensors"])
def test_invalid_adapter_is_400_and_leaves_nothing(gateway, tenant, tmp_path, case):
    _, key = tenant
    folder = tmp_path / "a"
    kwargs = {"nan": {"nan": True}, "wrong_shape": {"wrong_shape": True}, "other_base": {"base": OTHER_BASE_CONFIG}}
    config_path, weights_path = adapter_files(folder, **kwargs.get(case, {}))
    config, weights, filename = config_path.read_bytes(), weights_path.read_bytes(), "adapter_model.safetensors"
    if case == "pickle_name":
        weights, filename = PICKLE_BYTES, "adapter_model.bin"
    elif case == "pickle_content":
        weights = PICKLE_BYTES
    elif case == "bad_config_json":
        config = b"{not json"
    elif case == "top_k_above_r":
        config = json.dumps({**json.loads(config), "top_k": 99}).encode()
    elif case == "not_safetensors":
        weights = b"\x00" * 64
    before = _snapshot(gateway, key)
    err = assert_openai_error(_post(gateway, key, "bad", config, weights, filename), 400)
    assert err["code"] == "invalid_adapter"
    expected = {"nan": "NaN", "wrong_shape": "expected shape", "other_base": "expected shape",
                "pickle_name": "pickle", "pickle_content": "pickle", "top_k_above_r": "top_k"}
    if case in expected:
        assert expected[case] in err["message"]
    assert _snapshot(gateway, key) == before
    with gateway.client(key) as c:
        assert c.get("/v1/adapters/bad").status_code == 404


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "Upper", "x" * 65, "", "-lead", "sp ace", "ü"])
def test_bad_names_are_400_and_leave_nothing(gateway, tenant, tmp_path, name):
    _, key = tenant
    config, weights = adapter_files(tmp_path / "a")
    before = _snapshot(gateway, key)
    err = assert_openai_error(_post(gateway, key, name, config.read_bytes(), weights.read_bytes()), 400)
    assert err["param"] == "name"
    assert _snapshot(gateway, key) == before
    assert not (gateway.settings.data_dir / "escape").exists()


def test_name_of_64_chars_is_accepted(gateway, tenant, tmp_path):
    r = gateway.upload(tenant[1], "a" * 64, tmp_path / "a")
    assert r.status_code == 201, r.text


def test_oversized_weights_are_413_and_leave_nothing(gateway, tenant, tmp_path):
    _, key = tenant
    config, _ = adapter_files(tmp_path / "a")
    limit = gateway.settings.max_upload_bytes
    before = _snapshot(gateway, key)
    err = assert_openai_error(_post(gateway, key, "big", config.read_bytes(), b"\x00" * (limit + 1)), 413)
    assert err["param"] == "weights"
    assert _snapshot(gateway, key) == before


def test_oversized_upload_declared_in_content_length_is_413_before_reading(gateway, tenant):
    _, key = tenant
    head = (f"POST /v1/adapters HTTP/1.1\nHost: x\nAuthorization: Bearer {key}\n"
            "Content-Type: multipart/form-data; boundary=x\nContent-Length: 1000000000000\n")
    status, body = raw_request(gateway.url, head, b"--x\r\n")
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("form", ["missing_weights", "extra_field", "not_multipart", "garbage_multipart"])
def test_malformed_forms_are_400(gateway, tenant, tmp_path, form):
    _, key = tenant
    config, weights = adapter_files(tmp_path / "a")
    before = _snapshot(gateway, key)
    with gateway.client(key) as c:
        if form == "missing_weights":
            r = c.post("/v1/adapters", data={"name": "m"}, files={"config": ("c.json", config.read_bytes())})
        elif form == "extra_field":
            data, files = upload_form("m", config.read_bytes(), weights.read_bytes())
            r = c.post("/v1/adapters", data={**data, "evil": "1"}, files=files)
        elif form == "garbage_multipart":
            r = c.post("/v1/adapters", content=b"--x\r\nContent-[Disposition: nope\r\n\r\nzz\r\n--x--\r\n",
                       headers={"content-type": "multipart/form-data; boundary=x"})
        else:
            r = c.post("/v1/adapters", json={"name": "m"})
    assert_openai_error(r, 400)
    assert _snapshot(gateway, key) == before


def test_delete_evicts_from_engine_then_removes_files_and_row(gateway, engine, tenant, tmp_path):
    _, key = tenant
    assert gateway.upload(key, "gone", tmp_path / "a").status_code == 201
    internal = gateway.gw.registry.get_adapter(gateway.gw.registry.tenant_for_key(key).id, "gone").internal_id
    # Use it once so the engine holds it.
    gateway.openai(key).completions.create(model="gone", prompt="x", max_tokens=1)
    assert internal in engine.state.loaded
    with gateway.client(key) as c:
        assert c.delete("/v1/adapters/gone").status_code == 204
        assert_openai_error(c.get("/v1/adapters/gone"), 404)
        assert_openai_error(c.delete("/v1/adapters/gone"), 404)
    assert engine.state.unloads[-1] == internal
    assert internal not in engine.state.loaded
    assert internal not in gateway.store_entries()
    assert internal not in gateway.gw.registry.all_internal_ids()
    # The name is free again.
    assert gateway.upload(key, "gone", tmp_path / "b").status_code == 201


def test_delete_keeps_files_until_the_engine_confirms_the_eviction(make_engine, make_gateway, tmp_path):
    """An engine that fails to evict may still need the files (a queued request reloads them inside its step):
    the adapter is gone for the tenant at once, its folder stays tombstoned until a retry succeeds."""
    bad = make_engine()
    bad.state.unload_status = 500
    gw = make_gateway([bad.url], store_maintenance_interval_s=0.2)
    bad.state.store = gw.settings.store_dir
    _, key = gw.new_tenant()
    assert gw.upload(key, "x", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        assert c.delete("/v1/adapters/x").status_code == 204
        assert c.get("/v1/adapters").json()["data"] == []
        assert_openai_error(c.get("/v1/adapters/x"), 404)
        assert_openai_error(c.post("/v1/completions", json={"model": "x", "prompt": "p", "max_tokens": 1}), 404)
    (folder,) = [e for e in gw.store_entries() if e.startswith("fl-")]
    assert (gw.settings.store_dir / folder / "DELETED").exists()  # the engine's resolver refuses it now
    time.sleep(0.5)  # maintenance retries meanwhile, and fails: the files must stay
    assert [e for e in gw.store_entries() if e.startswith("fl-")] == [folder]
    assert [a.state for a in gw.gw.registry.list_adapters(None, state=None)] == ["deleting"]
    with gw.client(None) as c:
        metrics = c.get("/metrics").text
    assert re.search(rf'flylora_gateway_upstream_errors_total{{engine="{re.escape(bad.url)}",kind="unload"}} '
                     r"[1-9]", metrics)
    bad.state.unload_status = None  # the engine recovers: the next maintenance pass finishes the deletion
    deadline = time.monotonic() + 10
    while gw.gw.registry.list_adapters(None, state=None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.gw.registry.list_adapters(None, state=None) == []
    assert [e for e in gw.store_entries() if e.startswith("fl-")] == []


def test_failure_at_registration_removes_the_stored_folder(gateway, tenant, tmp_path, monkeypatch):
    """Two uploads of one name racing: the loser fails at the insert (409) and its folder is removed."""
    _, key = tenant
    assert gateway.upload(key, "race", tmp_path / "a").status_code == 201
    before = _snapshot(gateway, key)
    monkeypatch.setattr(gateway.gw.registry, "has_adapter_name", lambda *_: False)  # lose the pre-check
    err = assert_openai_error(gateway.upload(key, "race", tmp_path / "b", seed=5), 409)
    assert err["code"] == "adapter_exists"
    assert _snapshot(gateway, key) == before


def test_restart_finishes_interrupted_deletions_and_sweeps_leftovers(make_engine, make_gateway, tmp_path):
    fake = make_engine()
    data = tmp_path / "data"
    first = make_gateway([fake.url], data_dir=data)
    _, key = first.new_tenant()
    assert first.upload(key, "half", tmp_path / "a").status_code == 201
    tenant_id = first.gw.registry.tenant_for_key(key).id
    internal = first.gw.registry.mark_deleting(tenant_id, "half").internal_id  # as if killed mid-DELETE
    first.server.stop()
    stale = first.settings.store_dir / ".tmp-deadbeef"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    second = make_gateway([fake.url], data_dir=data)
    assert second.gw.registry.list_adapters(None, state=None) == []
    assert second.store_entries() == set()
    assert fake.state.unloads == [internal]


def test_bad_name_is_refused_before_the_weights_are_read(gateway, tenant, tmp_path):
    """The name part comes first: a bad name stops the upload even if the weights would be too large."""
    _, key = tenant
    config, _ = adapter_files(tmp_path / "a")
    too_big = b"\x00" * (gateway.settings.max_upload_bytes + 1)
    err = assert_openai_error(_post(gateway, key, "Bad/Name", config.read_bytes(), too_big), 400)
    assert err["param"] == "name"


def test_adapter_may_not_shadow_the_base_model(engine, make_gateway, tmp_path):
    gw = make_gateway([engine.url], base_model_id="tiny-base")
    _, key = gw.new_tenant()
    err = assert_openai_error(gw.upload(key, "tiny-base", tmp_path / "a"), 400)
    assert err["param"] == "name" and gw.store_entries() == set()


def test_upload_without_base_model_config_is_503_and_leaves_nothing(engine, make_gateway, tmp_path):
    gw = make_gateway([engine.url], base_model_dir=tmp_path / "missing")
    _, key = gw.new_tenant()
    err = assert_openai_error(gw.upload(key, "ok", tmp_path / "a"), 503)
    assert err["code"] == "base_model_unavailable"
    assert gw.store_entries() == set() and gw.gw.registry.all_internal_ids() == set()


def test_the_list_is_paged_by_name_with_a_cursor_and_shows_no_other_tenant(gateway, tmp_path):
    _, key = gateway.new_tenant()
    _, other = gateway.new_tenant()
    names = ["a-1", "a-2", "b-1", "c-1", "c-2"]
    for i, name in enumerate(names):
        assert gateway.upload(key, name, tmp_path / name, r=4, top_k=2, seed=i).status_code == 201
    assert gateway.upload(other, "b-0", tmp_path / "other", r=4, top_k=2).status_code == 201
    pages, after = [], None
    with gateway.client(key) as c:
        while True:
            page = c.get("/v1/adapters", params={"limit": 2, **({"after": after} if after else {})}).json()
            pages.append(page)
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert [[a["id"] for a in p["data"]] for p in pages] == [["a-1", "a-2"], ["b-1", "c-1"], ["c-2"]]
        assert [(p["first_id"], p["last_id"], p["has_more"]) for p in pages] == [
            ("a-1", "a-2", True), ("b-1", "c-1", True), ("c-2", "c-2", False)]
        assert [a["id"] for a in c.get("/v1/adapters").json()["data"]] == names  # one page by default
        assert c.get("/v1/adapters", params={"after": "zzz"}).json() == {
            "object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
        for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "ten"}, {"after": "x" * 65}):
            r = c.get("/v1/adapters", params=bad)
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"] == next(iter(bad)), r.text
