"""Request checks and SSE event rewriting, without HTTP."""

from __future__ import annotations

import json

import pytest

from server.errors import InvalidRequest
from server.proxy import parse_completion_request, prompt_size
from server.settings import Settings

SETTINGS = Settings(_env_file=None, max_prompt_chars=10, max_n=2)


def test_stream_always_asks_usage_of_engine_and_remembers_what_client_wanted():
    req = parse_completion_request(b'{"model":"m","prompt":"p","stream":true}', "completions", SETTINGS)
    assert req.stream and not req.wants_usage and req.payload["stream_options"] == {"include_usage": True}
    req = parse_completion_request(
        b'{"model":"m","prompt":"p","stream":true,"stream_options":{"include_usage":true}}', "completions", SETTINGS)
    assert req.wants_usage


def test_absent_max_tokens_is_left_to_the_engine():
    req = parse_completion_request(b'{"model":"m","prompt":"p"}', "completions", SETTINGS)
    assert "max_tokens" not in req.payload


@pytest.mark.parametrize("payload,size", [
    ({"prompt": "abc"}, 3), ({"prompt": ["ab", "c"]}, 3), ({"prompt": [1, 2, 3, 4]}, 4), ({"prompt": [[1, 2], [3]]}, 3),
])
def test_prompt_size_of_completions(payload, size):
    assert prompt_size("completions", payload) == size


def test_prompt_size_of_chat_counts_text_parts():
    msgs = [{"role": "user", "content": "abc"}, {"role": "user", "content": [{"type": "text", "text": "de"},
                                                                           {"type": "image_url"}]}]
    assert prompt_size("chat.completions", {"messages": msgs}) == 5


@pytest.mark.parametrize("payload", [{"prompt": None}, {"prompt": [None]}, {"prompt": []}, {"prompt": "x" * 11},
                                     {"prompt": "x", "n": 3}, {"prompt": "x", "best_of": 0},
                                     {"prompt": "x", "max_tokens": True}, {"prompt": "x", "stream_options": 1,
                                                                          "stream": True}])
def test_bad_payloads_are_rejected(payload):
    with pytest.raises(InvalidRequest):
        parse_completion_request(json.dumps({"model": "m", **payload}).encode(), "completions", SETTINGS)
