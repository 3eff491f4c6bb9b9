"""Auth (401 for a missing or wrong key, admin routes refuse tenant keys) and tenant isolation: another
tenant's adapter is indistinguishable from a missing one (404, the same body) in every route."""

from __future__ import annotations

import pytest

from tests.server.helpers import ADMIN_KEY, assert_openai_error

MESSAGES = [{"role": "user", "content": "hi"}]
TENANT_ROUTES = [
    ("GET", "/v1/models", None), ("GET", "/v1/adapters", None), ("GET", "/v1/adapters/x", None),
    ("DELETE", "/v1/adapters/x", None), ("POST", "/v1/adapters", None),
    ("POST", "/v1/chat/completions", {"model": "SmolLM2-135M-Instruct", "messages": MESSAGES}),
    ("POST", "/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": "x"}),
]
ADMIN_ROUTES = [("GET", "/admin/tenants", None), ("POST", "/admin/tenants", {"name": "zzz"}),
                ("DELETE", "/admin/tenants/zzz", None), ("POST", "/admin/tenants/zzz/keys", None)]


@pytest.mark.parametrize("method,path,body", TENANT_ROUTES)
@pytest.mark.parametrize("key", [None, "flk-wrong", ADMIN_KEY])
def test_tenant_routes_refuse_missing_wrong_or_admin_key(gateway, engine, method, path, body, key):
    before = len(engine.state.requests)
    with gateway.client(key) as c:
        r = c.request(method, path, json=body)
    err = assert_openai_error(r, 401)
    assert err["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert len(engine.state.requests) == before


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
def test_admin_routes_refuse_tenant_keys_and_no_key(gateway, tenant, method, path, body):
    for key in (tenant[1], None, "wrong"):
        with gateway.client(key) as c:
            assert_openai_error(c.request(method, path, json=body), 401)
    with gateway.admin() as c:
        assert "zzz" not in [t["name"] for t in c.get("/admin/tenants").json()["data"]]


def test_malformed_authorization_header_is_401(gateway, tenant):
    with gateway.client(None) as c:
        for header in (f"Basic {tenant[1]}", tenant[1], "Bearer", f"Bearer  x{tenant[1]}"):
            assert_openai_error(c.get("/v1/models", headers={"authorization": header}), 401)


def test_keys_are_stored_hashed_and_shown_once(gateway, tenant):
    name, key = tenant
    with gateway.admin() as c:
        listing = c.get("/admin/tenants").text
        new = c.post(f"/admin/tenants/{name}/keys")
    assert key not in listing and new.status_code == 201
    second = new.json()["api_key"]
    assert second != key and second.startswith("flk-")
    with gateway.gw.registry.db.connect() as conn:
        dump = "\n".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM api_keys"))
    assert key not in dump and second not in dump
    for k in (key, second):  # both keys work
        with gateway.client(k) as c:
            assert c.get("/v1/models").status_code == 200


def test_admin_tenant_lifecycle(gateway, tmp_path):
    with gateway.admin() as c:
        r = c.post("/admin/tenants", json={"name": "acme", "max_concurrency": 40})
        assert r.status_code == 201 and set(r.json()) == {"name", "api_key", "key_id"}
        key = r.json()["api_key"]
        assert_openai_error(c.post("/admin/tenants", json={"name": "acme"}), 409)
        assert_openai_error(c.post("/admin/tenants", json={"name": "Bad Name"}), 400)
        acme = next(t for t in c.get("/admin/tenants").json()["data"] if t["name"] == "acme")
        assert acme["max_concurrency"] == 40 and acme["adapters"] == 0
    assert gateway.upload(key, "a1", tmp_path / "a").status_code == 201
    internal = next(iter(gateway.gw.registry.all_internal_ids() - _others(gateway, "acme")))
    with gateway.admin() as c:
        assert c.delete("/admin/tenants/acme").status_code == 204
        assert_openai_error(c.delete("/admin/tenants/acme"), 404)
        assert_openai_error(c.post("/admin/tenants/acme/keys"), 404)
    assert internal not in gateway.store_entries()
    with gateway.client(key) as c:  # the key died with the tenant (cache invalidated too)
        assert_openai_error(c.get("/v1/models"), 401)


def _others(gateway, tenant_name):
    reg = gateway.gw.registry
    mine = reg.get_tenant(tenant_name).id
    return {a.internal_id for a in reg.list_adapters(None, state=None) if a.tenant_id != mine}


def test_other_tenants_adapter_is_indistinguishable_from_missing_everywhere(gateway, engine, tmp_path):
    (_, owner), (_, other) = gateway.new_tenant(), gateway.new_tenant()
    assert gateway.upload(owner, "secret", tmp_path / "a").status_code == 201

    def probe():
        with gateway.client(other) as c:
            return [
                c.get("/v1/adapters/secret"),
                c.delete("/v1/adapters/secret"),
                c.post("/v1/chat/completions", json={"model": "secret", "messages": MESSAGES}),
                c.post("/v1/completions", json={"model": "secret", "prompt": "x"}),
                c.post("/v1/chat/completions", json={"model": "secret", "messages": MESSAGES, "stream": True}),
            ], c.get("/v1/adapters").json(), [m["id"] for m in c.get("/v1/models").json()["data"]]

    before_engine = len(engine.state.requests)
    while_owned, listed, models = probe()
    assert listed == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    assert "secret" not in models
    for r in while_owned:
        assert_openai_error(r, 404)
    assert len(engine.state.requests) == before_engine
    # The owner still has it: the other tenant's DELETE did nothing.
    with gateway.client(owner) as c:
        assert c.get("/v1/adapters/secret").status_code == 200
        assert c.delete("/v1/adapters/secret").status_code == 204
    after_gone, _, _ = probe()
    assert [(r.status_code, r.json()) for r in while_owned] == [(r.status_code, r.json()) for r in after_gone]
