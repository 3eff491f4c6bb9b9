"""flylora_runtime.client.GatewayClient against a real gateway (real HTTP, real SQLite) in front of the fake
engine test double: tenants, adapters, readiness, and errors that carry the status and the OpenAI error."""

from __future__ import annotations

import itertools

import pytest

from flylora_runtime.client import APIError, GatewayClient, MissingKey, Unreachable
from flylora_runtime.engine.process import free_port

from tests.server.helpers import ADMIN_KEY, adapter_files

_n = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_n)}"


def test_create_tenant_then_upload_list_get_delete(gateway, tmp_path):
    with GatewayClient(gateway.url, ADMIN_KEY) as admin:
        name = _name("client")
        key = admin.create_tenant(name, max_concurrency=7, tokens_per_minute=1000)
        listed = {t["name"]: t for t in admin.list_tenants()}
        assert (listed[name]["max_concurrency"], listed[name]["tokens_per_minute"]) == (7, 1000)
        with admin.with_key(key) as tenant:
            adapter_files(tmp_path / "a", r=4, top_k=2)
            adapter_files(tmp_path / "b", r=4, top_k=2, seed=1)
            up = tenant.upload_adapters([("one", tmp_path / "a"), ("two", tmp_path / "b")], parallel=2)
            assert [a["id"] for a in up] == ["one", "two"] and up[0]["status"] == "ready"
            assert sorted(a["id"] for a in tenant.list_adapters()) == ["one", "two"]
            assert tenant.get_adapter("one") == up[0]
            assert tenant.ensure_adapter("one", tmp_path / "b") == (up[0], False)  # already there: kept
            tenant.delete_adapter("one")
            assert [a["id"] for a in tenant.list_adapters()] == ["two"]
            again, uploaded = tenant.ensure_adapter("one", tmp_path / "b")
            assert uploaded and again["id"] == "one" and again["sha256"] == up[1]["sha256"]
        admin.delete_tenant(name)
        assert name not in {t["name"] for t in admin.list_tenants()}


def test_ensure_tenant_issues_a_new_key_for_an_existing_tenant(gateway):
    with GatewayClient(gateway.url, ADMIN_KEY) as admin:
        name = _name("again")
        first, created = admin.ensure_tenant(name)
        second, created_again = admin.ensure_tenant(name)
    assert created and not created_again and first != second
    for key in (first, second):  # both keys work
        with GatewayClient(gateway.url, key) as tenant:
            assert tenant.list_adapters() == []


def test_keys_with_labels_are_listed_and_revoked_by_id_with_one_client_holding_both_keys(gateway):
    name = _name("keys")
    with GatewayClient(gateway.url, admin_key=ADMIN_KEY) as admin:
        first = admin.new_tenant(name, max_concurrency=3)
        assert first["name"] == name and first["api_key"].startswith("flk-")
        second = admin.new_key(name, label="ci")
        keys = admin.list_keys(name)
        assert [(k["id"], k["label"]) for k in keys] == [(first["key_id"], None), (second["key_id"], "ci")]
        assert all(first["api_key"] not in str(k) and second["api_key"] not in str(k) for k in keys)
        with pytest.raises(MissingKey) as err:  # no tenant key: refused before anything is sent
            admin.list_adapters()
        assert not err.value.admin and err.value.status is None
    # One client, both keys: the admin key goes to the tenant routes, the tenant key to the adapter routes.
    with GatewayClient(gateway.url, first["api_key"], admin_key=ADMIN_KEY) as both:
        assert both.list_adapters() == [] and name in {t["name"] for t in both.list_tenants()}
        both.revoke_key(name, first["key_id"])
        with pytest.raises(APIError) as err:  # the revoked key stops at once
            both.list_adapters()
        assert err.value.status == 401 and err.value.error["code"] == "invalid_api_key"
        with pytest.raises(APIError) as err:
            both.revoke_key(name, first["key_id"])
        assert err.value.status == 404
        assert [k["id"] for k in both.list_keys(name)] == [second["key_id"]]
    with GatewayClient(gateway.url, second["api_key"]) as tenant:
        assert tenant.list_adapters() == []
    with GatewayClient(gateway.url) as nobody, pytest.raises(MissingKey) as err:
        nobody.list_tenants()
    assert err.value.admin and "admin key" in err.value.message


def test_errors_carry_the_status_and_the_openai_error(gateway, tenant, tmp_path):
    _, key = tenant
    with GatewayClient(gateway.url, key) as c:
        with pytest.raises(APIError) as err:
            c.get_adapter("missing")
        e = err.value
        assert (e.status, e.code, e.type) == (404, "adapter_not_found", "invalid_request_error")
        assert "missing" in e.message and e.method == "GET" and e.url.endswith("/v1/adapters/missing")
        assert str(e).startswith(f"GET {gateway.url}/v1/adapters/missing: HTTP 404 (adapter_not_found): ")
        adapter_files(tmp_path / "a")
        c.upload_adapter("dup", tmp_path / "a")
        with pytest.raises(APIError) as err:
            c.upload_adapter("dup", tmp_path / "a")
        assert (err.value.status, err.value.code) == (409, "adapter_exists")
        with pytest.raises(APIError) as err:
            c.create_tenant("x")  # a tenant key is not the admin key
        assert err.value.status in (401, 403) and err.value.message
        with pytest.raises(APIError) as err:  # a name with a slash stays one path segment: not another route
            c.delete_adapter("../../admin/tenants")
        assert err.value.status == 404, err.value
    with GatewayClient(gateway.url, "flk-not-a-key") as stranger:
        with pytest.raises(APIError) as err:
            stranger.list_adapters()
        assert err.value.status == 401 and err.value.type


def test_an_unreachable_gateway_is_an_error_without_status(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with GatewayClient(url, "k", timeout=2) as c:
        with pytest.raises(Unreachable, match="cannot reach the gateway") as err:
            c.list_adapters()
        assert err.value.status is None and isinstance(err.value, APIError)
        assert not c.ready()
        with pytest.raises(TimeoutError, match="not ready after 0 s"):
            c.wait_ready(timeout=0.3, interval=0.1)


def test_upload_of_a_folder_that_is_not_an_adapter_is_refused_before_sending(gateway, tenant, tmp_path):
    with GatewayClient(gateway.url, tenant[1]) as c:
        with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
            (tmp_path / "adapter_config.json").write_text("{}")
            c.upload_adapter("nope", tmp_path)
        assert c.list_adapters() == []


def test_ready_follows_the_engine(gateway, engine):
    with GatewayClient(gateway.url) as c:
        assert c.ready() and c.wait_ready(timeout=5) < 5
        engine.state.health_status = 503
        try:
            assert not c.ready()
        finally:
            engine.state.health_status = 200


def test_list_adapters_follows_the_gateways_pages_to_the_end(gateway, tmp_path):
    with GatewayClient(gateway.url, ADMIN_KEY) as admin:
        key = admin.create_tenant(_name("pages"))
    with GatewayClient(gateway.url, key) as tenant:
        for i in range(5):
            adapter_files(tmp_path / str(i), r=4, top_k=2, seed=i)
            tenant.upload_adapter(f"p-{i}", tmp_path / str(i))
        assert [a["id"] for a in tenant.list_adapters(page_size=2)] == [f"p-{i}" for i in range(5)]
        assert [a["id"] for a in tenant.list_adapters()] == [f"p-{i}" for i in range(5)]
