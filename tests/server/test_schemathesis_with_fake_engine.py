"""Schemathesis fuzzes every operation of the gateway's own OpenAPI schema (bounded examples, real HTTP,
the fake engine test double behind it): no input produces a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (test extra)")
from hypothesis import HealthCheck, settings  # noqa: E402

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402

from tests.server.helpers import ADMIN_KEY  # noqa: E402

schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())


@pytest.fixture(scope="module")
def fuzz_key(gateway, tmp_path_factory):
    _, key = gateway.new_tenant()
    assert gateway.upload(key, "fuzz", tmp_path_factory.mktemp("fuzz")).status_code == 201
    return key


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_5xx_with_fake_engine(case, gateway, fuzz_key):
    key = ADMIN_KEY if case.path.startswith("/admin") else fuzz_key
    response = case.call(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
