"""The registry on both backends it supports, each real: SQLite in tmp_path and PostgreSQL (a server this test
session starts, tests/postgres.py). Schema creation and migration of an older database, tenants, keys (issue,
list, revoke, look up), adapters, tenant deletion, and the races between concurrent uploads, deletions and
lookups."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, ForeignKey, Integer, MetaData, String, Table, UniqueConstraint, insert

from server.errors import AdapterExists, KeyNotFound, TenantExists, TenantNotFound
from server.registry import DELETING, Adapter, Registry, make_db_engine
from server.security import hash_key, new_api_key, new_internal_id

from tests.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'r.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def registry(db_url):
    reg = Registry.open(db_url)
    yield reg
    reg.close()


def _adapter(tenant_id: int, name: str) -> Adapter:
    return Adapter(tenant_id=tenant_id, name=name, internal_id=new_internal_id(), base_model="b", r=8, top_k=2,
                   routing="signed", bytes=10, sha256="0" * 64, created=1)


def _rows(registry: Registry, sql: str) -> list[tuple[Any, ...]]:
    with registry.db.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


def _concurrently(n: int, fn) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released together; each result or the exception it raised."""
    barrier = threading.Barrier(n)

    def call(i: int) -> Any:
        barrier.wait()
        try:
            return fn(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


# --- schema -------------------------------------------------------------------------------------------------

def _old_schema() -> MetaData:
    """The tables as the first release created them (api_keys without label and hint)."""
    md = MetaData()
    Table("tenants", md, Column("id", Integer, primary_key=True), Column("name", String(64), unique=True,
                                                                          nullable=False),
          Column("created", BigInteger, nullable=False), Column("max_concurrency", Integer),
          Column("tokens_per_minute", BigInteger))
    Table("api_keys", md, Column("id", Integer, primary_key=True),
          Column("tenant_id", ForeignKey("tenants.id", ondelete="CASCADE"), index=True, nullable=False),
          Column("key_hash", String(64), unique=True, nullable=False), Column("created", BigInteger, nullable=False))
    Table("adapters", md, Column("id", Integer, primary_key=True),
          Column("tenant_id", ForeignKey("tenants.id", ondelete="CASCADE"), index=True, nullable=False),
          Column("name", String(64), nullable=False), Column("internal_id", String(35), unique=True, nullable=False),
          Column("base_model", String(256), nullable=False), Column("r", Integer, nullable=False),
          Column("top_k", Integer, nullable=False), Column("routing", String(16), nullable=False),
          Column("bytes", BigInteger, nullable=False), Column("sha256", String(64), nullable=False),
          Column("created", BigInteger, nullable=False), Column("state", String(16), nullable=False),
          UniqueConstraint("tenant_id", "name", name="uq_adapter_tenant_name"))
    return md


def test_an_older_database_is_migrated_in_place_and_its_keys_keep_working(db_url):
    old = _old_schema()
    engine = make_db_engine(db_url)
    key = new_api_key()
    iid = new_internal_id()
    with engine.begin() as conn:
        old.create_all(conn)
        tid = conn.execute(insert(old.tables["tenants"]).values(name="acme", created=1)).inserted_primary_key[0]
        conn.execute(insert(old.tables["api_keys"]).values(tenant_id=tid, key_hash=hash_key(key), created=1))
        conn.execute(insert(old.tables["adapters"]).values(
            tenant_id=tid, name="a", internal_id=iid, base_model="b", r=8, top_k=2, routing="signed", bytes=1,
            sha256="0" * 64, created=1, state="ready"))
    engine.dispose()

    reg = Registry.open(db_url)
    try:
        acme = reg.tenant_for_key(key)
        assert acme is not None and acme.name == "acme"
        assert [a.internal_id for a in reg.list_adapters(acme.id)] == [iid]
        [old_key] = reg.list_keys("acme")
        assert (old_key.tenant_id, old_key.label, old_key.hint) == (tid, None, None)
        record, second = reg.add_key("acme", label="ci")
        assert record.hint == "flk-..." + second[-4:] and record.label == "ci"
        reg.revoke_key("acme", old_key.id)
        assert reg.tenant_for_key(key) is None and reg.tenant_for_key(second) == acme
    finally:
        reg.close()
    Registry.open(db_url).close()  # a second open finds nothing to add


def test_replicas_opening_a_new_database_at_once_all_succeed(db_url):
    opened = _concurrently(6, lambda _i: Registry.open(db_url))
    assert all(isinstance(r, Registry) for r in opened), opened
    opened[0].create_tenant("one")
    assert [t.name for t, _ in opened[-1].list_tenants()] == ["one"]
    for reg in opened:
        reg.close()


# --- tenants and keys ------------------------------------------------------------------------------------------

def test_tenants_and_keys(registry):
    t, key = registry.create_tenant("acme", max_concurrency=40)
    assert (t.name, t.max_concurrency, t.tokens_per_minute) == ("acme", 40, None)
    with pytest.raises(TenantExists):
        registry.create_tenant("acme")
    assert registry.tenant_for_key(key) == t
    assert registry.tenant_for_key(key + "x") is None
    record, second = registry.add_key("acme", label="deploy bot")
    assert registry.tenant_for_key(second) == t
    with pytest.raises(TenantNotFound):
        registry.add_key("nobody")
    hashes = {r[0] for r in _rows(registry, "SELECT key_hash FROM api_keys")}
    assert hashes == {hash_key(key), hash_key(second)} == registry.key_hashes()
    keys = registry.list_keys("acme")
    assert [k.id for k in keys] == sorted(k.id for k in keys) and keys[-1] == record
    assert [k.label for k in keys] == [None, "deploy bot"] and keys[0].hint == "flk-..." + key[-4:]
    assert all(key not in str(k.public()) and second not in str(k.public()) for k in keys)


def test_revoking_one_key_keeps_the_tenant_its_adapters_and_other_keys(registry):
    acme, first = registry.create_tenant("acme")
    other, other_key = registry.create_tenant("other")
    registry.add_adapter(_adapter(acme.id, "x"))
    record, second = registry.add_key("acme")
    first_id = registry.list_keys("acme")[0].id
    other_id = registry.list_keys("other")[0].id

    with pytest.raises(KeyNotFound):  # another tenant's key id: refused, nothing revoked
        registry.revoke_key("acme", other_id)
    assert registry.tenant_for_key(other_key) == other

    revoked = registry.revoke_key("acme", first_id)
    assert revoked.key_hash == hash_key(first)
    assert registry.tenant_for_key(first) is None and registry.tenant_for_key(second) == acme
    assert registry.get_tenant("acme") == acme and [a.name for a in registry.list_adapters(acme.id)] == ["x"]
    assert [k.id for k in registry.list_keys("acme")] == [record.id]
    with pytest.raises(KeyNotFound):
        registry.revoke_key("acme", first_id)
    with pytest.raises(TenantNotFound):
        registry.revoke_key("nobody", record.id)
    registry.revoke_key("acme", record.id)  # the last key too: the tenant stays, keyless until a new one
    assert registry.list_keys("acme") == [] and registry.get_tenant("acme") == acme


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


def test_tenant_deletion_removes_its_keys_and_adapters_only(registry):
    a, key_a = registry.create_tenant("a")
    b, key_b = registry.create_tenant("b")
    registry.add_key("a")
    for t in (a, b):
        registry.add_adapter(_adapter(t.id, "x"))
    registry.delete_tenant(a.id)
    assert registry.tenant_for_key(key_a) is None and registry.tenant_for_key(key_b) == b
    assert _rows(registry, f"SELECT count(*) FROM api_keys WHERE tenant_id = {a.id}") == [(0,)]
    assert [x.tenant_id for x in registry.list_adapters(None, state=None)] == [b.id]
    with pytest.raises(TenantNotFound):
        registry.list_keys("a")
    with pytest.raises(TenantNotFound):  # an upload finishing after its tenant's deletion: refused
        registry.add_adapter(_adapter(a.id, "late"))


# --- races -----------------------------------------------------------------------------------------------------

def test_concurrent_uploads_of_one_name_register_exactly_one(registry):
    t, _ = registry.create_tenant("acme")
    results = _concurrently(8, lambda _i: registry.add_adapter(_adapter(t.id, "same")))
    winners = [r for r in results if isinstance(r, Adapter)]
    assert len(winners) == 1 and all(isinstance(r, AdapterExists) for r in results if r not in winners), results
    assert registry.get_adapter(t.id, "same") == winners[0]


def test_concurrent_deletes_of_one_adapter_have_one_winner(registry):
    t, _ = registry.create_tenant("acme")
    registry.add_adapter(_adapter(t.id, "x"))
    results = _concurrently(8, lambda _i: registry.mark_deleting(t.id, "x"))
    assert sum(r is not None for r in results) == 1, results
    assert all(r is None or r.state == DELETING for r in results)


def test_concurrent_tenant_creation_of_one_name_has_one_winner(registry):
    results = _concurrently(8, lambda _i: registry.create_tenant("dup"))
    assert sum(isinstance(r, tuple) for r in results) == 1, results
    assert sum(isinstance(r, TenantExists) for r in results) == 7
    assert len(registry.list_keys("dup")) == 1


def test_uploads_racing_a_tenant_deletion_leave_no_rows_behind(registry):
    victim, _ = registry.create_tenant("victim")
    bystander, key = registry.create_tenant("bystander")

    def work(i: int) -> Any:
        if i == 0:
            return registry.delete_tenant(victim.id)
        if i == 1:
            return registry.add_key("victim")
        return registry.add_adapter(_adapter(victim.id if i % 2 else bystander.id, f"a{i}"))

    results = _concurrently(10, work)
    victims = [r for i, r in enumerate(results) if i > 1 and i % 2]
    # Each racing upload either landed before the deletion (and went with it) or was refused as TenantNotFound.
    assert all(isinstance(r, (Adapter, TenantNotFound)) for r in victims), victims
    assert isinstance(results[1], (tuple, TenantNotFound)), results[1]
    assert _rows(registry, f"SELECT count(*) FROM adapters WHERE tenant_id = {victim.id}") == [(0,)]
    assert _rows(registry, f"SELECT count(*) FROM api_keys WHERE tenant_id = {victim.id}") == [(0,)]
    assert len(registry.list_adapters(bystander.id)) == 4 and registry.tenant_for_key(key) == bystander


def test_lookups_racing_a_revocation_never_see_the_key_afterwards(registry):
    t, key = registry.create_tenant("acme")
    key_id = registry.list_keys("acme")[0].id
    stop = threading.Event()
    seen: list[bool] = []

    def look() -> None:
        while not stop.is_set():
            seen.append(registry.tenant_for_key(key) is not None)

    threads = [threading.Thread(target=look) for _ in range(4)]
    for th in threads:
        th.start()
    try:
        registry.revoke_key("acme", key_id)
        after = [registry.tenant_for_key(key) for _ in range(20)]
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert after == [None] * 20 and any(seen)


# --- the gateway on PostgreSQL, through its HTTP API --------------------------------------------------------

def test_the_gateway_serves_tenants_keys_and_adapters_from_postgresql(engine, make_gateway, postgres_url, tmp_path):
    gw = make_gateway([engine.url], database_url=postgres_url)
    engine.state.store = gw.settings.store_dir
    assert gw.gw.registry.db.dialect.name == "postgresql"
    name, key = gw.new_tenant()
    assert gw.upload(key, "support", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        r = c.post("/v1/chat/completions", json={"model": "support", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == "support"
    with gw.admin() as admin:
        second = admin.post(f"/admin/tenants/{name}/keys").json()
        first_id = admin.get(f"/admin/tenants/{name}/keys").json()["data"][0]["id"]
        assert admin.delete(f"/admin/tenants/{name}/keys/{first_id}").status_code == 204
    with gw.client(key) as c:
        assert c.get("/v1/adapters").status_code == 401
    with gw.client(second["api_key"]) as c:
        assert [a["id"] for a in c.get("/v1/adapters").json()["data"]] == ["support"]
    with gw.admin() as admin:
        assert admin.delete(f"/admin/tenants/{name}").status_code == 204
    assert gw.store_entries() == set() and _rows(gw.gw.registry, "SELECT count(*) FROM adapters") == [(0,)]
