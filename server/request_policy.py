"""The request policy: what a completion request may ask of the shared engine.

Every field a client sends is checked against an allowlist, with a strict type and a cap for anything that
costs the engine work per request or per step (the table and the reasons are in docs/SECURITY.md). A field
outside the allowlist is refused with a 400 that names it, as OpenAI does, rather than dropped: a client
that sets ``chat_template`` or ``priority`` must learn that it had no effect. The operator can let named
extra fields through unchecked (``passthrough_request_fields``).

The body is parsed by pydantic-core's JSON parser (jiter, Rust): nesting deeper than its limit (200),
numbers beyond its range, invalid UTF-8 and lone surrogates are a 400; parsing costs time linear in the
body, which is itself capped, and never recurses in Python.

The result (:class:`CompletionRequest`) carries what admission needs: an estimate of the prompt's tokens,
the effective ``max_tokens`` (a default when the client set none) and the number of sequences, whose sum
is the tokens reserved from the tenant's budget while the request runs.
"""

# No ``from __future__ import annotations``: the request models are built inside :func:`_models` from the
# settings' caps, and pydantic resolves their annotations from that function's locals.

import hashlib
import hmac
import json
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError, from_json

from server.errors import InvalidRequest
from server.settings import Settings

log = logging.getLogger("flylora.gateway.policy")

#: Characters per token assumed when a prompt's tokens must be estimated without the tokenizer (typical of
#: BPE vocabularies on English text); the estimate is settled against the engine's usage when it arrives.
CHARS_PER_TOKEN = 4
#: ``max_tokens`` of a legacy completion that sets none: OpenAI's documented default (and vLLM's).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Bodies above this many bytes are parsed and checked in a worker thread, at most
#: :data:`PARALLEL_LARGE_PARSES` at once, so that parsing a large body never stalls the event loop that serves
#: every other request (smaller bodies, nearly all of them, are parsed in place: a thread hop costs more).
INLINE_PARSE_BYTES = 64 * 1024
PARALLEL_LARGE_PARSES = 2
TOKEN_ID_MAX = 2**31 - 1

#: Hints for fields whose type is a union (pydantic reports one error per member; one sentence is clearer).
UNION_HINTS = {
    "prompt": "must be a non-empty string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string, a list of text parts or null",
    "tool_choice": 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
}
#: Fields the gateway sets itself; a client sending one gets a message saying so.
GATEWAY_FIELDS = {"cache_salt": "`cache_salt` is set by the gateway (one salt per tenant) and cannot be sent."}


class UnsupportedParameter(InvalidRequest):
    """A request field outside the policy's allowlist."""

    code = "unsupported_parameter"


class _Strict(BaseModel):
    """Strict types, finite numbers, no field outside the model.

    An unknown field is found by one set difference before any field is validated and reported alone, so a
    body of a million unknown keys costs one error, not a million.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    _accepted: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._accepted = frozenset(info.alias or name for name, info in cls.model_fields.items())

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and not cls._accepted.issuperset(data):
            unknown = next(k for k in data if k not in cls._accepted)
            raise PydanticCustomError("unknown_field", "unknown field `{field}`", {"field": str(unknown)[:200]})
        return data


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PydanticCustomError("dict_type", "Input should be a valid dictionary")
    return value


#: A JSON object passed on as it is (a tool's parameters, a JSON schema): only its type is checked here, its
#: size counts against a cap, and the engine reads it. (Validating every key would cost time for nothing.)
JsonObject = Annotated[dict[str, Any], PlainValidator(_object, json_schema_input_type=dict[str, Any])]


def _list(item: Any, max_length: int, min_length: int = 0) -> Any:
    """A list type whose length is checked before its items, and whose first bad item stops validation."""
    return Annotated[list[item], Field(min_length=min_length, max_length=max_length, fail_fast=True)]


def _models(s: Settings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The chat and completion request models, with the caps of ``s``."""
    Short = Annotated[str, Field(max_length=256)]
    StopString = Annotated[str, Field(min_length=1, max_length=s.max_stop_chars)]
    TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]
    MaxTokens = Annotated[int, Field(ge=0, le=s.max_tokens_cap)]
    Choices = Annotated[int, Field(ge=1, le=s.max_n)]
    TopLogprobs = Annotated[int, Field(ge=0, le=s.max_logprobs)]
    Penalty = Annotated[float, Field(ge=-2, le=2)]
    Unit = Annotated[float, Field(ge=0, le=1)]
    Bias = Annotated[float, Field(ge=-100, le=100)]
    TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]

    class StreamOptions(_Strict):
        include_usage: bool | None = None
        continuous_usage_stats: bool | None = None

    class JsonSchemaFormat(_Strict):
        name: Annotated[str, Field(min_length=1, max_length=64)]
        description: str | None = None
        schema_: JsonObject | None = Field(default=None, alias="schema")
        strict: bool | None = None

    class ResponseFormat(_Strict):
        type: Literal["text", "json_object", "json_schema"]
        json_schema: JsonSchemaFormat | None = None

    class Sampling(_Strict):
        """Fields both endpoints accept."""

        model: Annotated[str, Field(min_length=1, max_length=256)]
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        max_tokens: MaxTokens | None = None
        n: Choices | None = None
        temperature: Annotated[float, Field(ge=0, le=2)] | None = None
        top_p: Unit | None = None
        top_k: Annotated[int, Field(ge=-1, le=TOKEN_ID_MAX)] | None = None
        min_p: Unit | None = None
        frequency_penalty: Penalty | None = None
        presence_penalty: Penalty | None = None
        repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
        seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
        stop: StopString | _list(StopString, s.max_stop) | None = None
        stop_token_ids: _list(TokenId, s.max_stop) | None = None
        bad_words: _list(StopString, s.max_bad_words) | None = None
        logit_bias: Annotated[dict[TokenKey, Bias], Field(max_length=s.max_logit_bias)] | None = None
        min_tokens: MaxTokens | None = None
        ignore_eos: bool | None = None
        include_stop_str_in_output: bool | None = None
        skip_special_tokens: bool | None = None
        spaces_between_special_tokens: bool | None = None
        add_special_tokens: bool | None = None
        echo: bool | None = None
        use_beam_search: Literal[False] | None = None
        prompt_logprobs: TopLogprobs | None = None
        response_format: ResponseFormat | None = None
        user: Short | None = None

    class TextPart(_Strict):
        type: Literal["text"]
        text: str

    class CalledFunction(_Strict):
        name: Short
        arguments: str

    class ToolCall(_Strict):
        id: Short
        type: Literal["function"]
        function: CalledFunction

    class ChatMessage(_Strict):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | _list(TextPart, s.max_messages) | None = None
        name: Short | None = None
        tool_calls: _list(ToolCall, s.max_tools) | None = None
        tool_call_id: Short | None = None
        refusal: str | None = None
        reasoning: str | None = None
        # An assistant message read back from an earlier answer carries these, always null.
        annotations: None = None
        audio: None = None
        function_call: None = None

    class FunctionDefinition(_Strict):
        name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
        description: str | None = None
        parameters: JsonObject | None = None
        strict: bool | None = None

    class ChatTool(_Strict):
        type: Literal["function"]
        function: FunctionDefinition

    class NamedFunction(_Strict):
        name: Annotated[str, Field(min_length=1, max_length=64)]

    class NamedToolChoice(_Strict):
        type: Literal["function"]
        function: NamedFunction

    class ChatCompletionBody(Sampling):
        """POST /v1/chat/completions: OpenAI's fields plus vLLM's sampling extras, nothing else."""

        messages: _list(ChatMessage, s.max_messages, min_length=1)
        max_completion_tokens: MaxTokens | None = None
        logprobs: bool | None = None
        top_logprobs: TopLogprobs | None = None
        tools: _list(ChatTool, s.max_tools) | None = None
        tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
        parallel_tool_calls: bool | None = None
        add_generation_prompt: bool | None = None
        continue_final_message: bool | None = None

    class CompletionBody(Sampling):
        """POST /v1/completions: OpenAI's fields plus vLLM's sampling extras, nothing else."""

        prompt: (Annotated[str, Field(min_length=1)] | _list(str, s.max_n, min_length=1)
                 | _list(TokenId, s.max_prompt_chars, min_length=1)
                 | _list(_list(TokenId, s.max_prompt_chars, min_length=1), s.max_n, min_length=1))
        logprobs: TopLogprobs | None = None
        best_of: Choices | None = None

    return ChatCompletionBody, CompletionBody


@dataclass
class CompletionRequest:
    """A checked request: ``payload`` is what goes to the engine (once the gateway set model and salt)."""

    payload: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool  # the client asked for the final usage chunk
    wants_continuous_usage: bool  # ... and for usage on every chunk
    prompt_tokens: int  # estimated (exact for token-id prompts)
    max_tokens: int  # effective: what the client set, or the default
    sequences: int  # generated sequences: n (or best_of) times the number of prompts
    choices_per_prompt: int = 1  # n: a stream's choice i answers prompt i // n

    @property
    def reservation(self) -> int:
        """Tokens held from the tenant's budget while the request runs (settled against its usage)."""
        return self.prompt_tokens + self.max_tokens * self.sequences


def _path(loc: tuple[Any, ...], known: set[str]) -> str:
    """``messages[0].content`` from a pydantic error location (union member tags left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in known:
            out += f".{part}" if out else part
    return out


class RequestPolicy:
    """Parses and checks completion request bodies against the settings' caps."""

    def __init__(self, settings: Settings):
        self.settings = settings
        chat, completion = _models(settings)
        self.models: dict[str, type[BaseModel]] = {"chat.completions": chat, "completions": completion}
        self.passthrough = frozenset(settings.passthrough_request_fields)
        self.known = {name for model in self._all_models() for name in _own_fields(model)}
        self._large_parses: anyio.CapacityLimiter | None = None

    def _all_models(self) -> list[type[BaseModel]]:
        found: list[type[BaseModel]] = []
        todo = list(self.models.values())
        while todo:
            model = todo.pop()
            if model in found:
                continue
            found.append(model)
            for info in model.model_fields.values():
                todo.extend(_nested_models(info.annotation))
        return found

    async def parse_async(self, body: bytes, endpoint: str) -> CompletionRequest:
        """:meth:`parse`, off the event loop for a large body (see :data:`INLINE_PARSE_BYTES`)."""
        if len(body) <= INLINE_PARSE_BYTES:
            return self.parse(body, endpoint)
        if self._large_parses is None:
            self._large_parses = anyio.CapacityLimiter(PARALLEL_LARGE_PARSES)
        return await anyio.to_thread.run_sync(self.parse, body, endpoint, limiter=self._large_parses)

    def schema(self, endpoint: str, ref_template: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The JSON schema of an endpoint's body and its definitions (for the OpenAPI document)."""
        schema = self.models[endpoint].model_json_schema(ref_template=ref_template)
        return schema, schema.pop("$defs", {})

    def parse(self, body: bytes, endpoint: str) -> CompletionRequest:
        """Check a completion request body; a 400 naming the field for anything outside the policy."""
        s = self.settings
        try:
            payload = from_json(body, allow_inf_nan=False)
        except ValueError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        extra = {k: payload.pop(k) for k in self.passthrough & payload.keys()}
        try:
            req: Any = self.models[endpoint].model_validate(payload)
        except ValidationError as exc:
            raise self._error(exc) from None
        chat = endpoint == "chat.completions"
        prompt_param = "messages" if chat else "prompt"
        chars, prompts = (_chat_chars(req), 1) if chat else _prompt_chars(req.prompt)
        if chat and req.tools:
            chars += len(json.dumps(payload["tools"]))
        if chars > s.max_prompt_chars:
            raise InvalidRequest(f"The prompt is {chars} characters long; the limit is {s.max_prompt_chars}.",
                                 param=prompt_param)
        sequences = max(req.n or 1, getattr(req, "best_of", None) or 1) * prompts
        if sequences > s.max_n:
            raise InvalidRequest(f"The request asks for {sequences} sequences (n or best_of times the number of "
                                 f"prompts); the limit is {s.max_n}.", param="n")
        max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(s.default_max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS, s.max_tokens_cap)
            payload["max_tokens"] = max_tokens
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise InvalidRequest(f"`min_tokens` ({req.min_tokens}) must not exceed max_tokens ({max_tokens}).",
                                 param="min_tokens")
        if not s.prompt_logprobs_enabled:
            if req.prompt_logprobs is not None:
                raise UnsupportedParameter("`prompt_logprobs` is turned off on this gateway.", param="prompt_logprobs")
            if not chat and req.echo and req.logprobs is not None:
                raise UnsupportedParameter("`echo` with `logprobs` returns prompt log-probabilities, which are "
                                           "turned off on this gateway.", param="echo")
        if req.response_format is not None and req.response_format.type != "text":
            size = len(json.dumps(payload["response_format"]))
            if size > s.max_structured_output_chars:
                raise InvalidRequest(f"`response_format` is {size} characters of JSON; the limit is "
                                     f"{s.max_structured_output_chars}.", param="response_format")
        stream = bool(req.stream)
        options = req.stream_options
        if options is not None and not stream:
            raise InvalidRequest("`stream_options` is only allowed with `stream: true`.", param="stream_options")
        wants_usage = bool(options and options.include_usage)
        wants_continuous = wants_usage and bool(options and options.continuous_usage_stats)
        if stream:
            # Usage is always asked of the engine, on every chunk: a stream cut short is charged what it
            # produced. The client sees usage only where it asked.
            payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        payload.update(extra)
        prompt_tokens = chars if not chat and isinstance(req.prompt, list) and req.prompt and \
            not isinstance(req.prompt[0], str) else math.ceil(chars / CHARS_PER_TOKEN)
        return CompletionRequest(payload=payload, model=req.model, stream=stream, wants_usage=wants_usage,
                                 wants_continuous_usage=wants_continuous, prompt_tokens=prompt_tokens,
                                 max_tokens=max_tokens, sequences=sequences, choices_per_prompt=req.n or 1)

    def _error(self, exc: ValidationError) -> InvalidRequest:
        errors = exc.errors(include_url=False, include_input=False)
        # A union field fails once per member: report the member that got furthest (the type matched and a
        # cap, a literal or a field did not), else one sentence naming the accepted types.
        same = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
        first = min(same, key=lambda e: (_error_rank(e) == 3, -len(e["loc"]), _error_rank(e)))
        loc = first["loc"]
        if first["type"] in ("extra_forbidden", "unknown_field"):
            if first["type"] == "unknown_field":
                loc = (*loc, first["ctx"]["field"])
            name = str(loc[-1])
            if len(loc) == 1 and name in GATEWAY_FIELDS:
                return UnsupportedParameter(GATEWAY_FIELDS[name], param=name)
            parent = _path(loc[:-1], self.known)
            path = (f"{parent}.{name}" if parent else name)[:200]
            return UnsupportedParameter(f"Unrecognized request field `{path}`: this gateway forwards only the "
                                        "fields it documents.", param=path)
        path = _path(loc, self.known) or None
        if first["type"] == "missing" and path == "model":
            return InvalidRequest("You must provide a model parameter.", param="model")
        hint = next((UNION_HINTS[str(p)] for p in reversed(loc) if p in UNION_HINTS), None)
        if hint is not None and len(same) > 1 and _error_rank(first) == 3:
            return InvalidRequest(f"`{path}` {hint}.", param=path)
        return InvalidRequest(f"`{path}`: {first['msg']}." if path else f"{first['msg']}.", param=path)


def _error_rank(error: Any) -> int:
    kind = error["type"]
    if kind == "literal_error":
        return 1
    if kind in ("extra_forbidden", "unknown_field", "missing"):
        return 2
    if kind.endswith("_type") or kind in ("union_tag_invalid", "is_instance_of"):
        return 3
    return 0  # the type matched, a cap or a format did not


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) or getattr(annotation, "__metadata__", ())
            for m in _nested_models(arg)]


def _own_fields(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _chat_chars(req: Any) -> int:
    """Characters of every string a chat template renders from the messages."""
    total = 0
    for message in req.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content:
            total += sum(len(part.text) for part in content)
        for text in (message.name, message.tool_call_id, message.refusal, message.reasoning):
            if text:
                total += len(text)
        for call in message.tool_calls or ():
            total += len(call.function.name) + len(call.function.arguments)
    return total


def _prompt_chars(prompt: Any) -> tuple[int, int]:
    """(characters or token ids, number of prompts) of a completion's ``prompt``."""
    if isinstance(prompt, str):
        return len(prompt), 1
    if isinstance(prompt[0], str):
        return sum(len(p) for p in prompt), len(prompt)
    if isinstance(prompt[0], int):
        return len(prompt), 1
    return sum(len(p) for p in prompt), len(prompt)


class CacheSalts:
    """The per-tenant ``cache_salt`` sent with every request: HMAC-SHA256 of the tenant id.

    vLLM mixes the salt into the hash of a prompt's first KV-cache block, so requests share cached prefixes
    only within one tenant: another tenant's time to first token says nothing about what this one sent.
    The key never leaves the gateway, so a tenant cannot compute another's salt; the id, not the name, is
    hashed (a re-created tenant of the same name starts cold).
    """

    def __init__(self, key: bytes):
        self.key = key
        self.salts: dict[int, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "CacheSalts":
        if settings.cache_salt_key is not None:
            key = settings.cache_salt_key.get_secret_value().encode()
        elif settings.admin_key is not None:
            key = hmac.new(settings.admin_key.get_secret_value().encode(), b"flylora prefix-cache salt",
                           hashlib.sha256).digest()
        else:
            log.warning("no cache_salt_key or admin_key: prefix-cache salts are random for this process")
            key = secrets.token_bytes(32)
        return cls(key)

    def __call__(self, tenant_id: int) -> str:
        salt = self.salts.get(tenant_id)
        if salt is None:
            if len(self.salts) >= 100_000:
                self.salts.clear()
            salt = self.salts[tenant_id] = hmac.new(self.key, b"tenant:%d" % tenant_id, hashlib.sha256).hexdigest()
        return salt
