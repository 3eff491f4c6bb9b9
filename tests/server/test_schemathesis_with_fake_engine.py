"""Schemathesis fuzzes every operation of the gateway's own OpenAPI schema (bounded examples, real HTTP,
the fake engine test double behind it): no input produces a 5xx, and every refusal is in OpenAI's error
shape. The completion bodies in the schema are the request policy's models, so the fuzzer explores every
allowed field up to its cap; a second run generates bodies that break the schema (negative mode)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (test extra)")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402

from tests.server.helpers import ADMIN_KEY  # noqa: E402

BASE = "SmolLM2-135M-Instruct"

RAW = create_app(Settings(_env_file=None)).openapi()
schema = schemathesis.openapi.from_dict(RAW)
completions = schemathesis.openapi.from_dict(RAW).include(path_regex="completions$")
completions.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


STATUSES: list[tuple[str, int]] = []


@pytest.fixture(scope="module")
def fuzz_key(gateway, tmp_path_factory):
    _, key = gateway.new_tenant()
    assert gateway.upload(key, "fuzz", tmp_path_factory.mktemp("fuzz")).status_code == 201
    return key


def _check(case, gateway, key: str) -> None:
    response = case.call(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    STATUSES.append((case.path, response.status_code))
    if response.status_code >= 400 and case.path != "/metrics":
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_5xx_with_fake_engine(case, gateway, fuzz_key):
    _check(case, gateway, ADMIN_KEY if case.path.startswith("/admin") else fuzz_key)


@completions.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_completion_body_gives_a_5xx_with_fake_engine(case, gateway, fuzz_key):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        # Name a model that exists (the base or the tenant's adapter), so that bodies the policy accepts reach
        # the engine; keep the fake engine's answers small (the default max_tokens is 1,024).
        case.body["model"] = "fuzz" if len(case.body) % 2 else BASE
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = 4
    _check(case, gateway, fuzz_key)


def test_the_fuzzed_bodies_reached_the_engine_and_were_refused_alike():
    """The run above was not all refusals: accepted bodies were answered by the engine, refused ones got 400."""
    if not STATUSES:
        pytest.skip("needs the fuzzing tests above in the same run")
    seen = {status for path, status in STATUSES if path.endswith("completions")}
    assert {200, 400} <= seen, seen
