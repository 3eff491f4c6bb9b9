"""Crash leftovers, with the real gateway process killed (SIGKILL) mid-operation and started again:

* a tenant deletion killed midway leaves no adapter row ``ready`` whose files are gone, the tenant's keys are
  already revoked, and the restart finishes the deletion (rows, folders and the tenant gone; other tenants
  untouched);
* a killed upload's staging folder is removed by the periodic sweep once it is older than
  ``staging_max_age_s``, without waiting for another restart.
"""

from __future__ import annotations

import threading
import time

import httpx

from server.registry import READY, Registry

from tests.server.gateway_process import GatewayProcess
from tests.server.helpers import adapter_files, upload_form


def _upload(gw: GatewayProcess, key: str, name: str, folder) -> None:
    config, weights = adapter_files(folder)
    data, files = upload_form(name, config.read_bytes(), weights.read_bytes())
    with gw.client(key) as c:
        r = c.post("/v1/adapters", data=data, files=files)
    assert r.status_code == 201, r.text


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_tenant_deletion_killed_midway_is_crash_safe_and_finished_at_restart(make_engine, tmp_path):
    engine = make_engine()
    data = tmp_path / "gw"
    gw = GatewayProcess(data, [engine.url]).start()
    engine.state.store = data / "adapters"
    try:
        doomed_key, keeper_key = gw.new_tenant("doomed"), gw.new_tenant("keeper")
        for i in range(4):
            _upload(gw, doomed_key, f"a{i}", tmp_path / f"a{i}")
        _upload(gw, keeper_key, "kept", tmp_path / "kept")
        engine.state.unload_delay_s = 1.0  # each eviction takes a second: the deletion takes four

        def delete() -> None:
            try:
                with gw.client() as c:
                    c.delete("/admin/tenants/doomed")
            except httpx.HTTPError:
                pass  # the gateway is killed under it

        deleter = threading.Thread(target=delete)
        deleter.start()
        assert _wait(lambda: len(engine.state.unloads) >= 2)  # one adapter purged, the next being evicted
        gw.kill()
        deleter.join(10)
    finally:
        gw.stop()

    registry = Registry.open(f"sqlite:///{data / 'registry.db'}")
    try:
        rows = registry.list_adapters(None, state=None)
        for row in rows:  # never ready without its files
            assert row.state != READY or (data / "adapters" / row.internal_id / "adapter_model.safetensors").exists()
        doomed_rows = [r for r in rows if r.name.startswith("a")]
        assert len(doomed_rows) in (1, 2, 3), doomed_rows  # at least one purged before the kill, one left
        assert {r.state for r in doomed_rows} == {"deleting"}
        assert registry.tenant_for_key(doomed_key) is None  # revoked at once
        assert len(registry.pending_tenant_deletions()) == 1
        kept_id = next(r.internal_id for r in rows if r.name == "kept")
    finally:
        registry.close()

    engine.state.unload_delay_s = 0.0
    with GatewayProcess(data, [engine.url]) as again:  # start-up finishes the deletion before serving
        with again.client() as c:
            assert [t["name"] for t in c.get("/admin/tenants").json()["data"]] == ["keeper"]
        with again.client(doomed_key) as c:
            assert c.get("/v1/adapters").status_code == 401
        with again.client(keeper_key) as c:
            assert [a["id"] for a in c.get("/v1/adapters").json()["data"]] == ["kept"]
        folders = {p.name for p in (data / "adapters").iterdir()}
        assert folders == {kept_id}


def _stalled_upload(url: str, key: str, folder, release: threading.Event) -> tuple[threading.Thread, dict]:
    """An upload that sends half its body, then waits for ``release``."""
    config, weights = adapter_files(folder)
    fields, files = upload_form("slow", config.read_bytes(), weights.read_bytes())
    request = httpx.Request("POST", url + "/v1/adapters", data=fields, files=files)
    body = request.read()
    out: dict = {}

    def stalled():
        yield body[: len(body) // 2]
        release.wait(30)
        yield body[len(body) // 2:]

    def send() -> None:
        try:
            out["status"] = httpx.post(url + "/v1/adapters", content=stalled(), timeout=30, headers={
                "authorization": f"Bearer {key}", "content-type": request.headers["content-type"]}).status_code
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=send)
    thread.start()
    return thread, out


def test_killed_uploads_staging_folder_is_swept_periodically_by_age(tmp_path):
    """Two gateway replicas share a store; one is killed mid-upload, the other sweeps the leftover by age."""
    data = tmp_path / "gw"
    store = data / "adapters"
    sweeper = GatewayProcess(data, staging_max_age_s=1.5, store_maintenance_interval_s=0.25).start()
    try:
        key = sweeper.new_tenant("t")
        # An upload in progress is never swept, however long it stalls.
        release = threading.Event()
        thread, out = _stalled_upload(sweeper.url, key, tmp_path / "a", release)
        assert _wait(lambda: any(p.name.startswith(".tmp-") for p in store.iterdir()))
        time.sleep(2.5)  # older than staging_max_age_s and not written meanwhile
        assert any(p.name.startswith(".tmp-") for p in store.iterdir())
        release.set()
        thread.join(30)
        assert out.get("status") == 201, out

        # The other replica dies mid-upload: its staging folder is a leftover.
        victim = GatewayProcess(data).start()
        release = threading.Event()
        try:
            thread, out = _stalled_upload(victim.url, key, tmp_path / "b", release)
            assert _wait(lambda: any(p.name.startswith(".tmp-") for p in store.iterdir()))
            victim.kill()
        finally:
            release.set()
            thread.join(30)
            victim.stop()
        (leftover,) = [p for p in store.iterdir() if p.name.startswith(".tmp-")]
        # Swept by a periodic pass of the running replica, once old enough; no restart involved.
        assert _wait(lambda: not leftover.exists(), timeout=15)
        with sweeper.client(key) as c:
            assert [a["id"] for a in c.get("/v1/adapters").json()["data"]] == ["slow"]
    finally:
        sweeper.stop()
