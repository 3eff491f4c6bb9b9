"""Receive a multipart adapter upload straight into a staging folder, under size limits, never all in memory.

Starlette's form parser spools files to the system temp dir with no size limit; here each part is written
as it arrives into the store's staging folder, and the upload stops with 413 the moment a part passes its
limit. The fields are ``name`` (text), ``config`` (adapter_config.json) and ``weights``
(adapter_model.safetensors); anything else is a 400.

Received bytes are collected in a buffer of at most :data:`WRITE_BUFFER_BYTES` per file and written by the
caller's thread runner (the upload threads), never on the event loop: a slow disk cannot stall other requests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from flylora_runtime.format.checkpoint import MAX_CONFIG_BYTES

from server.errors import InvalidRequest, PayloadTooLarge

MAX_NAME_BYTES = 1024
#: Room for multipart framing and headers on top of the file limits when checking Content-Length.
FRAMING_SLACK = 64 * 1024
#: Received file bytes held before they are written out (per file part).
WRITE_BUFFER_BYTES = 1 << 20
#: An upload in progress touches its staging folder this often, so that no store sweep (of this gateway or
#: another replica sharing the store) takes it for a leftover while bytes still arrive.
TOUCH_INTERVAL_S = 10.0

Runner = Callable[..., Awaitable[object]]


def upload_ceiling(max_weights_bytes: int) -> int:
    """The largest request body an upload may have."""
    return max_weights_bytes + MAX_CONFIG_BYTES + MAX_NAME_BYTES + FRAMING_SLACK


def declared_length(request: Request) -> int | None:
    """The request's Content-Length, if it declared a valid one."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() and len(declared) < 20 else None


@dataclass
class UploadedAdapter:
    name: str
    config_path: Path
    weights_path: Path
    config_filename: str
    weights_filename: str


@dataclass
class _Part:
    field_name: str | None = None
    filename: str | None = None
    size: int = 0
    limit: int = 0
    sink: BinaryIO | None = None
    text: bytearray = field(default_factory=bytearray)
    ended: bool = False


def _display_name(filename: str | None, default: str) -> str:
    """The uploaded file's base name for messages only (never used as a path)."""
    if not filename:
        return default
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:128] or default


class _Receiver:
    def __init__(self, config_path: Path, weights_path: Path, max_weights_bytes: int,
                 check_name: Callable[[str], None] | None):
        self.check_name = check_name
        self.paths = {"config": config_path, "weights": weights_path}
        self.limits = {"name": MAX_NAME_BYTES, "config": MAX_CONFIG_BYTES, "weights": max_weights_bytes}
        self.seen: dict[str, _Part] = {}
        self.part = _Part()
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}

    # python-multipart callbacks ----------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self.part = _Part()
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in self.limits:
            raise InvalidRequest(f"Unexpected form field {name!r}; expected name, config and weights.", param=name)
        if name in self.seen:
            raise InvalidRequest(f"Form field {name!r} was sent more than once.", param=name)
        raw_filename = options.get(b"filename")
        filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
        self.part = _Part(field_name=name, filename=filename, limit=self.limits[name])
        if name in self.paths:
            self.part.sink = open(self.paths[name], "wb")  # noqa: SIM115 - closed in on_part_end / close()
        self.seen[name] = self.part

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.size += end - start
        if part.size > part.limit:
            raise PayloadTooLarge(f"Form field {part.field_name!r} is larger than the limit of {part.limit} bytes.",
                                  param=part.field_name)
        part.text += data[start:end]  # a file part's buffer, written out by flush()

    def on_part_end(self) -> None:
        self.part.ended = True
        if self.part.sink is None and self.part.field_name == "name" and self.check_name is not None:
            # Refuse a bad name before a large weights part is received (curl sends fields in order).
            self.check_name(self.name())

    def name(self) -> str:
        try:
            return bytes(self.seen["name"].text).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("The adapter name is not valid UTF-8.", param="name") from None

    async def flush(self, run: Runner, *, everything: bool = False) -> None:
        """Write out file buffers of at least WRITE_BUFFER_BYTES (all of them with ``everything``) in ``run``;
        close the files whose part has ended."""
        for part in self.seen.values():
            if part.sink is None or part.sink.closed:
                continue
            if part.text and (everything or part.ended or len(part.text) >= WRITE_BUFFER_BYTES):
                data, part.text = part.text, bytearray()
                await run(part.sink.write, data)
            if part.ended:
                await run(part.sink.close)

    def close(self) -> None:
        for part in self.seen.values():
            if part.sink is not None and not part.sink.closed:
                part.sink.close()


async def receive_adapter_upload(request: Request, staging: Path, config_path: Path, weights_path: Path,
                                 *, max_weights_bytes: int, check_name: Callable[[str], None] | None = None,
                                 run: Runner | None = None) -> UploadedAdapter:
    """Stream the request's multipart body into ``config_path`` and ``weights_path`` (inside ``staging``).

    ``check_name`` is called on the name as soon as its part is complete (and may raise). ``run`` runs the
    file writes (default: anyio's worker threads). Raises :class:`InvalidRequest` (not multipart,
    missing/extra/duplicate field) or :class:`PayloadTooLarge`. The caller removes ``staging`` on any failure.
    """
    if run is None:
        import anyio

        run = anyio.to_thread.run_sync
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("Expected a multipart/form-data body with fields name, config and weights.")
    declared = declared_length(request)
    ceiling = upload_ceiling(max_weights_bytes)
    if declared is not None and declared > ceiling:
        raise PayloadTooLarge(f"The upload is {declared} bytes; the weights limit is {max_weights_bytes} bytes.",
                              param="weights")
    receiver = _Receiver(config_path, weights_path, max_weights_bytes, check_name)
    callbacks = {k: getattr(receiver, k) for k in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    total = 0
    touched = time.monotonic()
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > ceiling:
                raise PayloadTooLarge(f"The upload is larger than the limit of {max_weights_bytes} bytes.",
                                      param="weights")
            parser.write(chunk)
            await receiver.flush(run)
            if time.monotonic() - touched > TOUCH_INTERVAL_S:
                touched = time.monotonic()
                await run(os.utime, staging)
        parser.finalize()
        await receiver.flush(run, everything=True)
    except FormParserError as exc:
        raise InvalidRequest(f"The multipart body is malformed: {exc}") from None
    finally:
        receiver.close()
    missing = [f for f in ("name", "config", "weights") if f not in receiver.seen]
    if missing:
        raise InvalidRequest(f"Missing form field(s): {', '.join(missing)}.", param=missing[0])
    name = receiver.name()
    for f in ("config", "weights"):
        if not os.path.exists(receiver.paths[f]):
            raise InvalidRequest(f"Form field {f!r} must be a file.", param=f)
    return UploadedAdapter(
        name=name, config_path=config_path, weights_path=weights_path,
        config_filename=_display_name(receiver.seen["config"].filename, "adapter_config.json"),
        weights_filename=_display_name(receiver.seen["weights"].filename, "adapter_model.safetensors"),
    )
