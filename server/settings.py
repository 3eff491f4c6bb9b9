"""Gateway settings: one typed object, read from the environment (prefix ``FLYLORA_``) and an optional file.

Conventions shared with the engine (keep them identical on both sides):

* Data folder ``FLYLORA_DATA_DIR`` (default ``<repo>/.work``, the repo root being the parent of ``server/``).
* Registry ``sqlite:///<data>/registry.db`` unless ``FLYLORA_DATABASE_URL`` names another SQLAlchemy URL.
* Adapter store ``<data>/adapters`` (``FLYLORA_ADAPTER_STORE``): one folder per adapter, named by its internal id
  (``fl-`` + 32 lowercase hex), holding ``adapter_config.json`` and ``adapter_model.safetensors``.
* Base model served as ``FLYLORA_BASE_MODEL_ID``; its Hugging Face folder (for upload validation) is
  ``FLYLORA_BASE_MODEL_DIR``, default ``<data>/models/<base id>``.
* Engines ``FLYLORA_ENGINE_URLS``, comma-separated vLLM OpenAI servers, default ``http://127.0.0.1:8100``.

Every field can be set as ``FLYLORA_<FIELD NAME IN UPPER CASE>``; ``Settings(_env_file=path)`` (or
``flylora-gateway --env-file path``, or ``FLYLORA_ENV_FILE``) also reads a dotenv-style file, the
environment winning over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.security import admin_key_problem

#: The repository root: the parent of the ``server`` package.
REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_BASE_MODEL_ID = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    """Everything the gateway can be told. Invalid values raise ``ValueError`` naming the value."""

    # hide_input_in_errors: a refused admin key or database URL (with its password) is never echoed to a log.
    model_config = SettingsConfigDict(env_prefix="FLYLORA_", extra="ignore", validate_default=True,
                                      hide_input_in_errors=True)

    # --- where things live -------------------------------------------------------------------------------
    data_dir: Path = Field(default=REPO_ROOT / ".work", description="Data folder (registry, adapter store, models).")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the registry; default sqlite:///<data_dir>/registry.db.")
    adapter_store: Path | None = Field(
        default=None, description="Adapter store shared with the engine; default <data_dir>/adapters.")

    # --- the base model ------------------------------------------------------------------------------------
    base_model_id: str = Field(default=DEFAULT_BASE_MODEL_ID,
                               description="The name the engine serves the base model under.")
    base_model_dir: Path | None = Field(
        default=None, description="HF folder with the base model's config.json; default <data_dir>/models/<id>.")

    # --- engines -------------------------------------------------------------------------------------------
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default=["http://127.0.0.1:8100"], description="vLLM OpenAI servers, comma-separated in the environment.")
    engine_api_key: SecretStr | None = Field(
        default=None, description="Bearer key the engines require (FLYLORA_ENGINE_API_KEY, shared with "
                                  "flylora-engine); needed when engines listen beyond loopback.")
    engine_connect_timeout_s: float = Field(default=5.0, gt=0, description="Connect timeout to an engine.")
    engine_read_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest wait between two bytes from an engine (long prefill, slow stream).")
    engine_http_transport: Literal["auto", "aiohttp", "httpcore"] = Field(
        default="auto", description="Transport of the engine client; auto: aiohttp when httpx-aiohttp is installed.")
    engine_max_connections: int = Field(default=512, ge=1, description="Pooled connections to all engines.")
    health_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of an engine health probe.")
    unload_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one adapter eviction call.")
    affinity_ttl_s: float = Field(
        default=600.0, gt=0, description="How long a replica counts as holding an adapter after serving it.")
    affinity_max_entries: int = Field(default=100_000, ge=1, description="Adapters remembered by the router.")
    engine_cooldown_s: float = Field(
        default=5.0, ge=0, description="After a connection failure, a replica is tried last for this long.")
    routing_load_factor: float = Field(
        default=1.5, ge=1.0,
        description="An adapter's home replica is skipped while it has this many times its fair share in flight.")
    routing_min_spill_in_flight: int = Field(
        default=8, ge=1, description="An adapter's home replica with fewer requests in flight is never skipped.")
    health_check_interval_s: float = Field(
        default=2.0, ge=0, description="Seconds between active health checks of every engine (0: off).")
    health_check_failures: int = Field(
        default=2, ge=1, description="Consecutive failed health checks that eject an engine until one passes.")

    # --- the gateway itself --------------------------------------------------------------------------------
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(default=8000, ge=0, le=65535, description="Port the gateway listens on.")
    admin_key: SecretStr | None = Field(
        default=None, description="Admin bearer key; when unset, `flylora-gateway` generates and prints one.")
    completion_fast_path: bool = Field(
        default=True, description="Serve the completion routes from an ASGI middleware (faster, same behaviour).")
    auth_cache_ttl_s: float = Field(
        default=5.0, ge=0, description="Seconds a key -> tenant or name -> adapter lookup is cached (0: never).")
    key_directory_refresh_s: float = Field(
        default=10.0, ge=0, description="Seconds between reloads of the in-memory set of key hashes that lets "
                                        "unknown keys be refused without a query (0: no such set; every "
                                        "uncached key is then looked up, only repeats are answered from memory).")
    unknown_key_lookups_per_s: float = Field(
        default=20.0, gt=0, description="Registry lookups per second for keys not in that set (keys issued by "
                                        "another replica since the last reload); beyond it they get 401 at once.")
    unknown_key_cache_entries: int = Field(
        default=10_000, ge=1, description="Key hashes found unknown, remembered (LRU) so repeats cost no query.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve /metrics on this port only (keep it off the public network); unset: on the main port.")
    metrics_host: str | None = Field(
        default=None, description="Address of the metrics port; default the gateway's address.")

    # --- limits --------------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(default=1 << 30, ge=1, description="Largest adapter weights file (413 above).")
    max_request_bytes: int = Field(
        default=2 << 20, ge=1, description="Largest completion request body (413 above): bounds the memory and the "
        "parsing time one request can cost.")
    max_concurrency_per_tenant: int = Field(
        default=16, ge=1, description="Requests one tenant may have in flight (429 above); tenants may override. "
        "The default is a quarter of an engine's default batch (64 sequences), so one tenant cannot fill it.")
    tokens_per_minute_per_tenant: int = Field(
        default=2_000_000, ge=0, description="Prompt + completion tokens per tenant per minute (0: unlimited).")

    # --- reliability (docs/RELIABILITY.md) -------------------------------------------------------------------
    admission_in_flight_per_engine: int = Field(
        default=64, ge=0,
        description="Completion requests in flight per engine replica (size it to the engine's --max-num-seqs); "
                    "more wait in fair per-tenant queues. 0: no cap, no queue.")
    admission_tenant_share: float = Field(
        default=0.75, gt=0, le=1, description="Largest fraction of those slots one tenant may hold.")
    admission_queue_depth: int = Field(
        default=64, ge=0, description="Requests one tenant may have waiting for a slot (429 above).")
    admission_queue_timeout_s: float = Field(
        default=30.0, gt=0, description="A request waiting this long for a slot gets 429 (it was never sent).")
    adapter_check_interval_s: float = Field(
        default=1.0, ge=0, description="Seconds between checks that an adapter's stored files are unchanged.")
    delete_grace_s: float = Field(
        default=10.0, ge=0,
        description="A deleted adapter's running requests may finish for this long; then they are cut.")
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, in-flight requests may finish for this long; then they are cut.")

    # --- what a completion request may ask of the shared engine (docs/SECURITY.md) ---------------------------
    max_tokens_cap: int = Field(default=4096, ge=1, description="Largest max_tokens accepted (400 above).")
    default_max_tokens: int = Field(
        default=1024, ge=1, description="max_tokens of a chat completion that sets none (a completion that sets "
        "none gets OpenAI's default, 16); lowered to max_tokens_cap when above it.")
    max_prompt_chars: int = Field(
        default=512 * 1024, ge=1,
        description="Largest prompt, in characters (or token ids) over all messages and tool definitions.")
    max_n: int = Field(
        default=16, ge=1, description="Most sequences one request may generate: n (or best_of) times the number "
        "of prompts (400 above).")
    max_messages: int = Field(default=1024, ge=1, description="Most messages in one chat request.")
    max_stop: int = Field(default=8, ge=0, description="Most `stop` strings (and `stop_token_ids`) per request.")
    max_bad_words: int = Field(default=16, ge=0, description="Most `bad_words` per request.")
    max_stop_chars: int = Field(default=256, ge=1, description="Longest `stop` string or bad word, in characters.")
    max_logit_bias: int = Field(default=300, ge=0, description="Most entries in `logit_bias`.")
    max_logprobs: int = Field(default=20, ge=0, description="Largest `logprobs` / `top_logprobs`.")
    prompt_logprobs_enabled: bool = Field(
        default=False, description="Allow `prompt_logprobs` (and completions' `echo` with `logprobs`): a "
        "log-softmax over the vocabulary for every prompt token.")
    max_tools: int = Field(default=64, ge=0, description="Most tool definitions in one chat request.")
    max_structured_output_chars: int = Field(
        default=16384, ge=0, description="Largest `response_format` (a JSON schema is compiled into a grammar by "
        "the engine), in characters of JSON; 0 refuses structured output.")
    passthrough_request_fields: Annotated[list[str], NoDecode] = Field(
        default=[], description="Extra request fields forwarded to the engine unchecked (comma-separated), for an "
        "engine extension the operator trusts; every other field outside the policy is refused.")
    cache_salt_key: SecretStr | None = Field(
        default=None, description="Key of the per-tenant prefix-cache salt (an HMAC of the tenant id); default "
        "derived from the admin key, so that every gateway replica computes the same salt.")
    # --- uploads and the adapter store (docs/SECURITY.md, "Uploads and stored adapters") ---------------------
    engine_max_lora_rank: int = Field(
        default=32, ge=1, description="The engines' --max-lora-rank: an adapter of higher rank is refused at upload.")
    engine_form: bool = Field(
        default=True, description="Also store each adapter's bf16 engine form (flylora_engine.bf16.safetensors, about "
        "half of an fp32 checkpoint's size, not counted in a tenant's quota): bf16 engines load it without converting "
        "the checkpoint (a cold adapter's load ~0.1 s -> ~0.02 s). Turn off when every engine runs float32.")
    max_uploads_per_tenant: int = Field(default=2, ge=1, description="Uploads one tenant may have in progress (429).")
    max_concurrent_uploads: int = Field(default=8, ge=1, description="Uploads in progress over all tenants (429).")
    upload_threads: int = Field(
        default=2, ge=1, description="Threads that write, validate and store uploads (apart from request handling).")
    max_adapters_per_tenant: int = Field(default=100, ge=0, description="Adapters one tenant may store (0: no limit).")
    max_stored_bytes_per_tenant: int = Field(
        default=20 << 30, ge=0, description="Weight bytes one tenant may store (0: no limit).")
    min_free_store_bytes: int = Field(
        default=2 << 30, ge=0, description="Free space kept on the store's disk: uploads that could use it get 507.")
    staging_max_age_s: float = Field(
        default=3600.0, gt=0, description="An upload folder not written for this long is a leftover and removed.")
    store_maintenance_interval_s: float = Field(
        default=300.0, ge=0, description="Seconds between leftover sweeps and retries of unfinished deletions (0: "
        "only at start-up).")

    # --- metrics -------------------------------------------------------------------------------------------
    max_adapter_labels: int = Field(
        default=500, ge=0, description="Distinct adapter label values in metrics; the rest share `other`.")

    # --- quality monitoring (per-request energies, docs/QUALITY.md) ---------------------------------------
    quality_enabled: bool = Field(
        default=True, description="Collect per-request energies from the engines into per-adapter windows.")
    quality_window: int = Field(
        default=100, ge=2, le=100_000, description="Requests per quality window (and per reference window).")
    quality_flush_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between fetches of finished requests' energies from the engines.")
    quality_refresh_s: float = Field(
        default=15.0, gt=0, description="Seconds between reloads of the quality gauges from the database.")
    quality_queue_max: int = Field(
        default=100_000, ge=1, description="Finished requests waiting for their energies (the oldest dropped).")
    quality_engine_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one energies fetch.")

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            urls = [str(v).rstrip("/") for v in value]
            bad = [u for u in urls if not u.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"engine URLs must start with http:// or https://, found {bad}")
            if not urls:
                raise ValueError("at least one engine URL is required, found none")
            return urls
        return value

    @field_validator("admin_key", "engine_api_key")
    @classmethod
    def _check_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            problem = admin_key_problem(value.get_secret_value())
            if problem is not None:
                raise ValueError(f"FLYLORA_{str(info.field_name).upper()} is refused: {problem}")
        return value

    @field_validator("passthrough_request_fields", mode="before")
    @classmethod
    def _split_fields(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("base_model_id")
    @classmethod
    def _check_base_id(cls, value: str) -> str:
        if not value or value.startswith("fl-"):
            raise ValueError(f"base_model_id must be non-empty and not start with 'fl-', found {value!r}")
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'registry.db'}"
        if self.adapter_store is None:
            self.adapter_store = self.data_dir / "adapters"
        if self.base_model_dir is None:
            self.base_model_dir = self.data_dir / "models" / self.base_model_id
        if self.metrics_port is not None and self.metrics_port != 0 and self.metrics_port == self.gateway_port:
            raise ValueError(f"metrics_port must differ from gateway_port ({self.gateway_port}): the point of it "
                             "is to keep /metrics off the public port")
        return self

    # Typed accessors for the derived fields (never None after validation).
    @property
    def db_url(self) -> str:
        return str(self.database_url)

    @property
    def store_dir(self) -> Path:
        return Path(self.adapter_store)  # type: ignore[arg-type]

    @property
    def base_dir(self) -> Path:
        return Path(self.base_model_dir)  # type: ignore[arg-type]
