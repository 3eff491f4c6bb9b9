"""AdapterStore (atomic commit, removal, sweep) and the id and key formats. The registry: test_registry.py."""

from __future__ import annotations

import os
import time

import pytest

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
