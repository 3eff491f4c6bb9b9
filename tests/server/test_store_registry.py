"""AdapterStore (atomic commit, removal, sweep) and Registry (real SQLite in tmp_path)."""

from __future__ import annotations

import os
import time

import pytest

from server.errors import AdapterExists, TenantExists, TenantNotFound
from server.registry import DELETING, Adapter, Registry
from server.security import INTERNAL_ID_RE, hash_key, new_api_key, new_internal_id
from server.store import AdapterStore


def _stage(store: AdapterStore, payload: bytes = b"w"):
    staging = store.new_staging()
    config, weights = store.staged_files(staging)
    config.write_bytes(b"{}")
    weights.write_bytes(payload)
    return staging


def test_commit_renames_a_complete_folder_into_place(tmp_path):
    store = AdapterStore(tmp_path / "store")
    staging = _stage(store, b"weights")
    assert staging.parent == store.root and staging.name.startswith(".tmp-")
    assert store.ids() == set()  # staging is invisible as an adapter
    iid = new_internal_id()
    final = store.commit(staging, iid)
    assert final == store.root / iid and not staging.exists()
    assert sorted(os.listdir(final)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (final / "adapter_model.safetensors").read_bytes() == b"weights"
    assert store.ids() == {iid}
    with pytest.raises(FileExistsError):
        store.commit(_stage(store), iid)


def test_remove_and_path_checks(tmp_path):
    store = AdapterStore(tmp_path)
    iid = new_internal_id()
    store.commit(_stage(store), iid)
    assert store.remove(iid) is True
    assert store.remove(iid) is False
    assert os.listdir(tmp_path) == []
    for bad in ("../x", "fl-XYZ", "support", "fl-" + "0" * 31):
        with pytest.raises(ValueError, match="internal id"):
            store.path(bad)


def _age(folder, seconds: float) -> None:
    """Make a folder and everything in it look last written ``seconds`` ago."""
    then = time.time() - seconds
    for p in [*folder.iterdir(), folder]:
        os.utime(p, (then, then))


def test_sweep_removes_only_old_leftovers(tmp_path):
    store = AdapterStore(tmp_path)
    kept, orphan, fresh_orphan = new_internal_id(), new_internal_id(), new_internal_id()
    for iid in (kept, orphan, fresh_orphan):
        store.commit(_stage(store), iid)
    old_staging, active_staging, in_progress = _stage(store), _stage(store), _stage(store)
    for p in (store.root / orphan, store.root / kept, old_staging, active_staging, in_progress):
        _age(p, 7200)
    os.utime(store.staged_files(in_progress)[1])  # an upload still writing its weights into an old folder
    removed = store.sweep({kept}, active={active_staging.name})
    assert sorted(removed) == sorted([orphan, old_staging.name])
    assert store.ids() == {kept, fresh_orphan}
    assert active_staging.exists() and in_progress.exists()
    assert store.sweep(None, min_age_s=1.0) == [active_staging.name]  # no longer held, and old: a leftover


def test_ids_and_keys_formats():
    assert INTERNAL_ID_RE.fullmatch(new_internal_id())
    k1, k2 = new_api_key(), new_api_key()
    assert k1 != k2 and k1.startswith("flk-") and len(k1) >= 40
    assert hash_key(k1) != k1 and len(hash_key(k1)) == 64


@pytest.fixture
def registry(tmp_path):
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    yield reg
    reg.close()


def _adapter(tenant_id: int, name: str) -> Adapter:
    return Adapter(tenant_id=tenant_id, name=name, internal_id=new_internal_id(), base_model="b", r=8, top_k=2,
                   routing="signed", bytes=10, sha256="0" * 64, created=1)


def test_tenants_and_keys(registry):
    t, key = registry.create_tenant("acme", max_concurrency=40)
    assert (t.name, t.max_concurrency, t.tokens_per_minute) == ("acme", 40, None)
    with pytest.raises(TenantExists):
        registry.create_tenant("acme")
    assert registry.tenant_for_key(key) == t
    assert registry.tenant_for_key(key + "x") is None
    second = registry.add_key("acme")
    assert registry.tenant_for_key(second) == t
    with pytest.raises(TenantNotFound):
        registry.add_key("nobody")
    with registry.engine.connect() as conn:
        hashes = {r[0] for r in conn.exec_driver_sql("SELECT key_hash FROM api_keys")}
    assert hashes == {hash_key(key), hash_key(second)}


def test_adapters_unique_per_tenant_and_deleting_state(registry):
    a, _ = registry.create_tenant("a")
    b, _ = registry.create_tenant("b")
    one = registry.add_adapter(_adapter(a.id, "x"))
    registry.add_adapter(_adapter(b.id, "x"))  # same name, other tenant: fine
    with pytest.raises(AdapterExists):
        registry.add_adapter(_adapter(a.id, "x"))
    assert registry.get_adapter(a.id, "x") == one
    assert registry.get_adapter(b.id, "y") is None
    assert [t.name for t, _ in registry.list_tenants()] == ["a", "b"]
    assert [n for _, n in registry.list_tenants()] == [1, 1]
    taken = registry.mark_deleting(a.id, "x")
    assert taken is not None and taken.state == DELETING
    assert registry.mark_deleting(a.id, "x") is None  # only one deleter wins
    assert registry.get_adapter(a.id, "x") is None and registry.list_adapters(a.id) == []
    assert registry.has_adapter_name(a.id, "x")  # the name stays taken until the row goes
    registry.delete_adapter_row(one.internal_id)
    assert not registry.has_adapter_name(a.id, "x")
    registry.delete_tenant(b.id)
    assert [t.name for t, _ in registry.list_tenants()] == ["a"] and registry.list_adapters(None, state=None) == []
