"""Hot-swap plumbing in vLLM's API server: resolve adapters from the store, unload them for real.

- :class:`StoreResolver` (a vLLM ``LoRAResolver``): a request whose ``model`` is an adapter id the engine
  has not seen is looked up as ``<store>/<id>/``; the adapter is validated against the served base model
  (and the engine's max rank, ``FLYLORA_MAX_LORA_RANK``) in a worker thread (off the API server's event
  loop, which also warms the page cache for the engine's read), then handed to the engine, which loads it
  into its CPU cache and a device slot on first use. A folder with an engine form (written by the gateway
  from the checkpoint it validated at upload: :mod:`flylora_runtime.format.engine_form`) has its structure
  checked only: its values were checked at upload, and the engine checks the engine form's values as it
  reads them (scanning the fp32 checkpoint was a fifth of a cold adapter's load). Ids must match
  :data:`ADAPTER_ID_RE`, so a name can never address a path outside the store. A folder holding a tombstone (``DELETED``, written by the gateway
  before it deletes an adapter) is refused; an invalid adapter is remembered (by its files' mtimes), so
  requests for it do not validate it again and again. A valid folder with an engine form has its structure
  remembered by the exact bytes that decide it (the config, the checkpoint's header, the checkpoint's size):
  every adapter of one shape has the same ones, so the next cold adapter of that shape is not parsed again
  (~2.3 ms of its first request here, on the way to the engine).
- vLLM's ``/v1/unload_lora_adapter`` only forgets the name (upstream issue #54839): the engine keeps the
  weights in its CPU cache and slot. :func:`unload_frees_engine_copy` (installed by :mod:`.patches`) makes it
  also call ``engine.remove_lora``, so unloading really frees the engine's copy. Before that it fails every
  request still holding the adapter (queued or running) with a 404, aborts them in the engine, and
  :func:`refuse_unloaded_adapters` refuses any request that resolved the adapter before the unload and is
  only now being added: vLLM reloads an adapter a scheduled request needs from its path inside the engine
  step, where a failure (the folder is being deleted) kills the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import struct
from collections import OrderedDict

from flylora_runtime.format.checkpoint import (CONFIG_NAME, EXTRA_TENSORS_READ, MAX_CONFIG_BYTES, TOMBSTONE_NAME,
                                               WEIGHTS_NAME, validate_dir)
from flylora_runtime.format.header import header_limit
from flylora_runtime.format.errors import AdapterError
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.format.engine_form import ENGINE_FORM_NAME

logger = logging.getLogger("flylora.resolver")

#: Adapter ids the store resolver accepts: a name is never a path.
ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
STORE_ENV = "FLYLORA_ADAPTER_STORE"
MAX_RANK_ENV = "FLYLORA_MAX_LORA_RANK"
#: Invalid adapters remembered by the resolver (each entry: an id and two mtimes).
MAX_REMEMBERED_INVALID = 4096
#: Unloaded adapter int ids remembered to refuse late requests (ints; vLLM never reuses one).
MAX_DEAD_IDS = 100_000
#: Valid structures remembered by the resolver (each entry: a 32-byte digest).
MAX_REMEMBERED_VALID = 4096


class StoreResolver:
    """Resolve ``lora_name`` to ``<store>/<lora_name>/`` after validating it against the base model."""

    def __init__(self, store: str, base: BaseModelSpec | None, max_rank: int | None = None):
        self.store = os.path.realpath(store)
        self.base = base
        self.max_rank = max_rank
        self._invalid: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._valid: OrderedDict[bytes, None] = OrderedDict()  # structure digests (_structure_key) found valid
        self._max_header = header_limit(base.max_adapter_tensors() + EXTRA_TENSORS_READ) if base is not None else 0

    def path_for(self, lora_name: str) -> str | None:
        if not ADAPTER_ID_RE.match(lora_name) or ".." in lora_name:
            return None
        path = os.path.join(self.store, lora_name)
        if os.path.dirname(os.path.realpath(path)) != self.store:
            return None
        if os.path.exists(os.path.join(path, TOMBSTONE_NAME)):
            return None  # being deleted
        return path if os.path.isfile(os.path.join(path, CONFIG_NAME)) else None

    def _stamp(self, path: str) -> tuple[float, float]:
        try:
            return (os.stat(os.path.join(path, CONFIG_NAME)).st_mtime, os.stat(os.path.join(path, WEIGHTS_NAME)).st_mtime)
        except OSError:
            return (0.0, 0.0)

    def _validate(self, lora_name: str, path: str) -> bool:
        stamp = self._stamp(path)
        if self._invalid.get(lora_name) == stamp:
            return False
        form = _has_engine_form(path)
        key = _structure_key(path, self._max_header) if form else None
        if key is not None and key in self._valid:
            self._valid.move_to_end(key)  # the same bytes validated before: the same result
        else:
            try:
                validate_dir(path, self.base, max_rank=self.max_rank, hash_file=False,  # type: ignore[arg-type]
                             check_values=not form)
            except AdapterError as exc:
                logger.warning("adapter %s in the store is invalid: %s", lora_name, exc)
                self._invalid[lora_name] = stamp
                while len(self._invalid) > MAX_REMEMBERED_INVALID:
                    self._invalid.popitem(last=False)
                return False
            if key is not None:
                self._valid[key] = None
                while len(self._valid) > MAX_REMEMBERED_VALID:
                    self._valid.popitem(last=False)
        self._invalid.pop(lora_name, None)
        _read_ahead(os.path.join(path, ENGINE_FORM_NAME))
        return True

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        from vllm.lora.request import LoRARequest

        path = self.path_for(lora_name)
        if path is None:
            return None
        if self.base is not None and not await asyncio.to_thread(self._validate, lora_name, path):
            return None
        # lora_int_id is replaced by the serving layer with a unique counter value.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=path)


def _has_engine_form(path: str) -> bool:
    """Whether the folder holds an engine form no older than its checkpoint (the gateway wrote both)."""
    try:
        return (os.stat(os.path.join(path, ENGINE_FORM_NAME)).st_mtime_ns
                >= os.stat(os.path.join(path, WEIGHTS_NAME)).st_mtime_ns)
    except OSError:
        return False


def _structure_key(path: str, max_header: int) -> bytes | None:
    """A digest of everything a structure-only ``validate_dir`` of ``path`` reads: the config's bytes, the
    checkpoint's header (its length and JSON) and the checkpoint's size. Equal digests, equal verdicts (the
    resolver's base model and max rank are fixed). None when a file is missing or out of bounds (then
    ``validate_dir`` decides, and says why)."""
    try:
        with open(os.path.join(path, CONFIG_NAME), "rb") as fh:
            config = fh.read(MAX_CONFIG_BYTES + 1)
        weights = os.path.join(path, WEIGHTS_NAME)
        size = os.path.getsize(weights)
        with open(weights, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (hlen,) = struct.unpack("<Q", head)
            if len(config) > MAX_CONFIG_BYTES or 8 + hlen > size or hlen > max_header:
                return None
            head += fh.read(hlen)
    except OSError:
        return None
    digest = hashlib.blake2b(digest_size=32)
    for part in (len(config).to_bytes(8, "little"), config, size.to_bytes(8, "little"), head):
        digest.update(part)
    return digest.digest()


def _read_ahead(path: str) -> None:
    """Ask the kernel to bring the engine form into the page cache now (asynchronously): the engine maps it
    in its loop."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def _base_spec_from_vllm_args() -> BaseModelSpec | None:
    model_dir = os.environ.get("FLYLORA_BASE_MODEL_DIR")
    if model_dir and os.path.isfile(os.path.join(model_dir, "config.json")):
        return BaseModelSpec.from_pretrained(model_dir)
    return None


def install_resolver() -> None:
    """Register :class:`StoreResolver` when ``FLYLORA_ADAPTER_STORE`` names a directory (idempotent)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    store = os.environ.get(STORE_ENV)
    if not store or "FlyLoRA store" in LoRAResolverRegistry.get_supported_resolvers():
        return
    if not os.path.isdir(store):
        raise ValueError(f"{STORE_ENV}={store!r} is not a directory")
    rank = os.environ.get(MAX_RANK_ENV, "")
    LoRAResolverRegistry.register_resolver(
        "FlyLoRA store", StoreResolver(store, _base_spec_from_vllm_args(), int(rank) if rank.isdigit() else None))


def _not_found(lora_name: str) -> Exception:
    from vllm.exceptions import VLLMNotFoundError

    return VLLMNotFoundError(f"The model `{lora_name}` does not exist.")


def fail_requests_using(engine_client, lora_name: str, lora_int_id: int) -> list[str]:
    """Refuse from now on any request for ``lora_int_id``; fail the ones in flight with a 404 (the client sees
    the adapter is gone) and drop them from the API server's bookkeeping. Returns their ids, to abort in the
    engine. Synchronous: nothing can be added between the snapshot and the refusal."""
    processor = getattr(engine_client, "output_processor", None)
    if processor is None or not hasattr(processor, "request_states"):
        logger.warning("FlyLoRA: cannot see the requests in flight; requests for %s are not failed", lora_name)
        return []
    dead = _dead_ids(processor)
    dead[lora_int_id] = None
    while len(dead) > MAX_DEAD_IDS:
        dead.popitem(last=False)
    doomed = [(rid, state.queue) for rid, state in list(processor.request_states.items())
              if getattr(state, "lora_request", None) is not None
              and (state.lora_request.lora_int_id == lora_int_id or state.lora_name == lora_name)]
    ids = processor.abort_requests([rid for rid, _ in doomed], internal=True)
    for _, queue in doomed:
        if queue is not None:
            queue.put(_not_found(lora_name))  # replaces the abort output: the request ends with this error
    return ids


def _dead_ids(processor) -> OrderedDict:
    found = getattr(processor, "_flylora_dead_lora_ids", None)
    if found is None:
        found = processor._flylora_dead_lora_ids = OrderedDict()
    return found


def unload_frees_engine_copy(original):
    """``OpenAIServingModels.unload_lora_adapter`` that fails the adapter's requests and frees the engine's
    copy."""

    async def unload_lora_adapter(self, request):
        known = self.lora_requests.get(request.lora_name)
        result = await original(self, request)
        if known is not None and isinstance(result, str):
            # No await between the name's removal (in ``original``) and this: a request either is in flight
            # now (failed here) or is added later (refused by add_request below).
            ids = fail_requests_using(self.engine_client, request.lora_name, known.lora_int_id)
            if ids:
                await self.engine_client.engine_core.abort_requests_async(ids)
                logger.warning("FlyLoRA: adapter %s unloaded with %d requests in flight; they were failed",
                               request.lora_name, len(ids))
            # The engine handles the abort before this call (one ordered input queue), so no step needs the
            # adapter again and nothing reloads it from its path.
            await self.engine_client.remove_lora(known.lora_int_id)
            logger.info("FlyLoRA: freed adapter %s (int id %d) in the engine", request.lora_name,
                        known.lora_int_id)
        return result

    return unload_lora_adapter


def refuse_unloaded_adapters(original_add):
    """``OutputProcessor.add_request`` that refuses a request whose adapter was unloaded after it resolved."""

    def add_request(self, request, *args, **kwargs):
        lora = getattr(request, "lora_request", None)
        if lora is not None and lora.lora_int_id in getattr(self, "_flylora_dead_lora_ids", ()):
            raise _not_found(lora.lora_name)  # resolved before its unload, added after it
        return original_add(self, request, *args, **kwargs)

    return add_request
