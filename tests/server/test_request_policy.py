"""The request policy (server/request_policy.py) without HTTP: the allowlist, the caps, the bombs a parser must
survive, what is added for the engine, and the per-tenant prefix-cache salt."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from pydantic import SecretStr

from server.errors import InvalidRequest
from server.request_policy import CacheSalts, RequestPolicy
from server.settings import Settings

POLICY = RequestPolicy(Settings(_env_file=None, max_prompt_chars=100, max_n=4, admin_key="policy-admin-key-not-secret-0123456789"))
MSG = [{"role": "user", "content": "hi"}]


def parse(body: dict | bytes, endpoint: str = "chat.completions", policy: RequestPolicy = POLICY):
    return policy.parse(body if isinstance(body, bytes) else json.dumps(body).encode(), endpoint)


def refused(body: dict | bytes, endpoint: str = "chat.completions", policy: RequestPolicy = POLICY) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as exc:
        parse(body, endpoint, policy)
    assert exc.value.status == 400 and exc.value.message
    return exc.value


def test_a_plain_request_passes_with_a_default_max_tokens():
    chat = parse({"model": "m", "messages": MSG})
    assert chat.payload == {"model": "m", "messages": MSG, "max_tokens": 1024} and chat.max_tokens == 1024
    legacy = parse({"model": "m", "prompt": "p"}, "completions")
    assert legacy.payload["max_tokens"] == 16 and legacy.sequences == 1
    capped = RequestPolicy(Settings(_env_file=None, max_tokens_cap=100))
    assert parse({"model": "m", "messages": MSG}, policy=capped).max_tokens == 100
    own = parse({"model": "m", "messages": MSG, "max_completion_tokens": 7, "max_tokens": 9})
    assert own.max_tokens == 7 and "max_tokens" in own.payload and own.payload["max_tokens"] == 9


def test_the_openai_fields_and_vllms_sampling_extras_are_accepted():
    body = {
        "model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
            {"type": "text", "text": "a"}]}, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "refusal": None,
            "annotations": None, "audio": None, "function_call": None}, {"role": "tool", "tool_call_id": "c1",
                                                                         "content": "ok"}],
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.1, "frequency_penalty": 0.1,
        "presence_penalty": -0.1, "repetition_penalty": 1.1, "seed": -5, "stop": ["x", "y"], "stop_token_ids": [2],
        "bad_words": ["bad"], "logit_bias": {"42": -100}, "logprobs": True, "top_logprobs": 5, "n": 2,
        "min_tokens": 1, "max_tokens": 8, "ignore_eos": False, "user": "u", "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "parallel_tool_calls": False, "response_format": {"type": "json_object"}, "use_beam_search": False,
        "add_generation_prompt": True, "continue_final_message": False, "skip_special_tokens": True,
    }
    req = parse(body)
    assert req.stream and req.wants_usage and req.wants_continuous_usage and req.sequences == 2
    assert req.payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


@pytest.mark.parametrize("field,value", [
    ("chat_template", "{{ 7*7 }}"), ("chat_template_kwargs", {"x": 1}), ("priority", -100),
    ("request_id", "someone-elses"), ("kv_transfer_params", {}), ("vllm_xargs", {}), ("structured_outputs",
                                                                                       {"regex": "(a+)+$"}),
    ("mm_processor_kwargs", {}), ("documents", []), ("logits_processors", ["x"]), ("stream_interval", 50),
    ("thinking_token_budget", 5), ("length_penalty", 2.0), ("made_up", 1),
])
def test_fields_outside_the_allowlist_are_refused_by_name(field, value):
    err = refused({"model": "m", "messages": MSG, field: value})
    assert err.param == field and err.code == "unsupported_parameter" and f"`{field}`" in err.message


def test_nested_unknown_fields_and_non_text_parts_are_refused_with_their_path():
    assert refused({"model": "m", "messages": [{"role": "user", "content": "x", "x": 1}]}).param == "messages[0].x"
    image = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://169.254.169.254/latest/meta-data/"}}]}]}
    assert refused(image).param == "messages[0].content[0].image_url"
    assert refused({"model": "m", "prompt": "x", "prompt_embeds": "AAAA"}, "completions").param == "prompt_embeds"
    assert refused({"model": "m", "prompt": "x", "suffix": "s"}, "completions").param == "suffix"
    assert refused({"model": "m", "prompt": "x", "tools": []}, "completions").param == "tools"


def test_a_client_cache_salt_is_refused_and_passthrough_fields_are_forwarded():
    err = refused({"model": "m", "messages": MSG, "cache_salt": "guess"})
    assert err.param == "cache_salt" and "set by the gateway" in err.message
    policy = RequestPolicy(Settings(_env_file=None, passthrough_request_fields="vendor_knob, other"))
    assert parse({"model": "m", "messages": MSG, "vendor_knob": [1]}, policy=policy).payload["vendor_knob"] == [1]


@pytest.mark.parametrize("extra,param", [
    ({"stop": ["s"] * 9}, "stop"), ({"stop": "x" * 257}, "stop"), ({"stop": ""}, "stop"),
    ({"stop_token_ids": list(range(9))}, "stop_token_ids"), ({"bad_words": ["w"] * 17}, "bad_words"),
    ({"bad_words": ["w" * 257]}, "bad_words[0]"), ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"n": 5}, "n"), ({"max_tokens": 4097}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"top_logprobs": 21}, "top_logprobs"), ({"use_beam_search": True}, "use_beam_search"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"), ({"prompt_logprobs": 0}, "prompt_logprobs"),
    ({"min_tokens": 1025}, "min_tokens"), ({"max_tokens": 10, "min_tokens": 11}, "min_tokens"),
    ({"messages": MSG * 1025}, "messages"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 100}}]}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 65}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "enum": ["v" * 100] * 200}}}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"temperature": 2.5}, "temperature"), ({"seed": 2**63}, "seed"), ({"model": "x" * 257}, "model"),
])
def test_caps_are_enforced(extra, param):
    assert refused({"model": "m", "messages": MSG, **extra}).param == param


def test_sequences_count_every_prompt_and_best_of():
    assert parse({"model": "m", "prompt": ["a", "b"], "n": 2}, "completions").sequences == 4
    assert refused({"model": "m", "prompt": ["a", "b", "c"], "n": 2}, "completions").param == "n"
    assert refused({"model": "m", "prompt": "a", "best_of": 5}, "completions").param == "best_of"
    assert parse({"model": "m", "prompt": [[1, 2], [3]], "best_of": 2}, "completions").sequences == 4


def test_prompt_logprobs_by_echo_is_refused_unless_enabled():
    body = {"model": "m", "prompt": "a", "echo": True, "logprobs": 1}
    assert refused(body, "completions").param == "echo"
    enabled = RequestPolicy(Settings(_env_file=None, prompt_logprobs_enabled=True))
    assert parse({**body, "prompt_logprobs": 2}, "completions", enabled).payload["prompt_logprobs"] == 2


def test_structured_output_can_be_turned_off():
    off = RequestPolicy(Settings(_env_file=None, max_structured_output_chars=0))
    assert refused({"model": "m", "messages": MSG, "response_format": {"type": "json_object"}},
                   policy=off).param == "response_format"
    assert parse({"model": "m", "messages": MSG, "response_format": {"type": "text"}}, policy=off)


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": MSG, "max_tokens": "10"}, "max_tokens"),
    ({"model": "m", "messages": MSG, "max_tokens": 1.0}, "max_tokens"),
    ({"model": "m", "messages": MSG, "max_tokens": True}, "max_tokens"),
    ({"model": "m", "messages": MSG, "stream": "yes"}, "stream"),
    ({"model": "m", "messages": MSG, "stop": True}, "stop"),
    ({"model": "m", "messages": MSG, "stop": [1]}, "stop[0]"),
    ({"model": "m", "messages": MSG, "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": MSG, "stream_options": []}, "stream_options"),
    ({"model": "m", "messages": MSG, "logit_bias": []}, "logit_bias"),
    ({"model": "m", "messages": {"role": "user"}}, "messages"),
    ({"model": "m", "messages": [["user", "hi"]]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": True}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "root", "content": "x"}]}, "messages[0].role"),
    ({"model": ["m"], "messages": MSG}, "model"),
    ({"model": "m", "messages": MSG, "tool_choice": 3}, "tool_choice"),
    ({"messages": MSG}, "model"),
])
def test_wrong_json_types_are_a_400_naming_the_field(body, param):
    assert refused(body).param == param


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "prompt": 5}, "prompt"), ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": [None]}, "prompt[0]"), ({"model": "m", "prompt": [1, -1]}, "prompt[1]"),
    ({"model": "m", "prompt": [[1], "a"]}, "prompt[0]"), ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": "x" * 101}, "prompt"), ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
])
def test_completion_prompts_are_checked(body, param):
    assert refused(body, "completions").param == param


@pytest.mark.parametrize("name,body", [
    ("deep nesting", b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("deep objects", b'{"model":"m","messages":[{"role":"user","content":' + b'{"a":' * 50_000 + b"1"
     + b"}" * 50_000 + b"}]}"),
    ("a 5,000-digit integer", b'{"model":"m","messages":[],"seed":' + b"7" * 5000 + b"}"),
    ("a 100,000-digit integer", b'{"model":"m","max_tokens":' + b"9" * 100_000 + b"}"),
    ("NaN", b'{"model":"m","messages":[],"temperature":NaN}'),
    ("a lone surrogate", b'{"model":"\\ud800","messages":[]}'),
    ("invalid UTF-8", b'{"model":"\xff","messages":[]}'),
    ("not an object", b"[1, 2]"), ("empty", b""), ("a bare string", b'"x"'),
])
def test_json_bombs_are_a_400_in_bounded_time(name, body):
    started = time.perf_counter()
    err = refused(body)
    assert time.perf_counter() - started < 0.5, name
    assert err.param is None or err.param in ("temperature", "model", "messages")


def test_overflowing_floats_are_refused_where_a_number_is_checked():
    assert refused(b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1e999}').param \
        == "temperature"


def test_the_prompt_token_estimate_and_the_reservation():
    req = parse({"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 10, "n": 2})
    assert (req.prompt_tokens, req.reservation) == (10, 10 + 2 * 10)
    ids = parse({"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}, "completions")
    assert (ids.prompt_tokens, ids.reservation) == (3, 8)  # token ids are counted exactly


def test_cache_salts_are_keyed_per_tenant_and_never_the_name():
    salts = CacheSalts.from_settings(Settings(_env_file=None, admin_key="policy-admin-key-not-secret-0123456789"))
    again = CacheSalts.from_settings(Settings(_env_file=None, admin_key="policy-admin-key-not-secret-0123456789"))
    other_key = CacheSalts.from_settings(Settings(_env_file=None, admin_key="policy-admin-key-not-secret-0123456789",
                                                  cache_salt_key=SecretStr("another")))
    assert salts(1) == again(1) != salts(2)  # the same on every replica with the same key; one per tenant
    assert other_key(1) != salts(1)
    assert len(salts(1)) == 64 and all(c in "0123456789abcdef" for c in salts(1))  # vLLM accepts it as is
    anonymous = CacheSalts.from_settings(Settings(_env_file=None))  # no key at all: random per process
    assert anonymous(1) != CacheSalts.from_settings(Settings(_env_file=None))(1)


def _fit(make, limit: int) -> bytes:
    """The largest ``make(n)`` (a body growing with n) that fits in ``limit`` bytes, near enough."""
    n = max(1, int(1000 * limit / len(make(1000))))
    while len(body := make(n)) > limit:
        n = int(n * 0.98)
    return body


ONE = [{"role": "user", "content": "x"}]
#: The costliest body of each shape: (endpoint, body of at most ``limit`` bytes).
WORST_BODIES = {
    "nesting": lambda limit: ("chat.completions", b'{"model":"m","messages":' + b"[" * (limit - 40)),
    "one long prompt": lambda limit: ("completions", _fit(
        lambda n: json.dumps({"model": "m", "prompt": "x" * n}).encode(), limit)),
    "many messages": lambda limit: ("chat.completions", _fit(
        lambda n: json.dumps({"model": "m", "messages": ONE * n}).encode(), limit)),
    "many token ids": lambda limit: ("completions", _fit(
        lambda n: json.dumps({"model": "m", "prompt": [1] * n}).encode(), limit)),
    "many bad token ids": lambda limit: ("completions", _fit(
        lambda n: json.dumps({"model": "m", "prompt": [-1] * n}).encode(), limit)),
    "many unknown fields": lambda limit: ("chat.completions", _fit(
        lambda n: json.dumps({f"f{i}": 0 for i in range(n)}).encode(), limit)),
    "many nested unknown fields": lambda limit: ("chat.completions", _fit(lambda n: json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "x", **{f"k{i}": 0 for i in range(n)}}]}).encode(),
        limit)),
    "many stop strings": lambda limit: ("chat.completions", _fit(
        lambda n: json.dumps({"model": "m", "messages": ONE, "stop": ["a"] * n}).encode(), limit)),
    "a huge tool schema": lambda limit: ("chat.completions", _fit(lambda n: json.dumps({
        "model": "m", "messages": ONE, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {f"k{i}": [1] for i in range(n)}}}]}).encode(), limit)),
}


@pytest.mark.parametrize("name", list(WORST_BODIES))
def test_worst_case_bodies_at_the_size_cap_cost_bounded_time_and_memory(name):
    """At the default body cap (2 MiB), the costliest bodies of each shape are refused with one error within a
    bounded time (10 s: it is a shared machine); the Python memory they cost is linear in the body, under 32x (measured on a quarter-size
    body: tracing every allocation is slow). Bounds are generous: the machine running the suite is shared."""
    import tracemalloc

    policy = RequestPolicy(Settings(_env_file=None))
    endpoint, body = WORST_BODIES[name](policy.settings.max_request_bytes)
    assert len(body) <= policy.settings.max_request_bytes
    started = time.perf_counter()
    with pytest.raises(InvalidRequest):
        policy.parse(body, endpoint)
    assert time.perf_counter() - started < 10.0  # 0.6 s for the slowest, a tool schema, on a busy 2-core machine
    endpoint, body = WORST_BODIES[name](policy.settings.max_request_bytes // 4)
    tracemalloc.start()
    try:
        with contextlib.suppress(InvalidRequest):  # a quarter-size body may pass the caps
            policy.parse(body, endpoint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * len(body), peak


def test_large_bodies_are_parsed_off_the_event_loop():
    import threading

    import anyio

    from server.request_policy import INLINE_PARSE_BYTES

    policy = RequestPolicy(Settings(_env_file=None))
    small = json.dumps({"model": "m", "prompt": "x"}).encode()
    large = json.dumps({"model": "m", "prompt": "x" * INLINE_PARSE_BYTES}).encode()
    threads: list[int] = []
    parse = policy.parse

    def recording(body: bytes, endpoint: str):
        threads.append(threading.get_ident())
        return parse(body, endpoint)

    policy.parse = recording  # type: ignore[method-assign]

    async def main() -> int:
        await policy.parse_async(small, "completions")
        await policy.parse_async(large, "completions")
        return threading.get_ident()

    loop_thread = anyio.run(main)
    assert threads[0] == loop_thread and threads[1] != loop_thread
