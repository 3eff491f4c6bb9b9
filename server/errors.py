"""One error type per failure, each mapped once to an HTTP status and OpenAI's error shape.

Routes raise these; :func:`install_error_handlers` turns them (and ``flylora_runtime``'s adapter errors,
and FastAPI's own validation/404/405 errors) into ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flylora_runtime.format import errors as adapter_errors

log = logging.getLogger("flylora.gateway")


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def internal_error_response() -> JSONResponse:
    """The one answer to an unexpected failure (the details go to the log, never to the client)."""
    return JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)


class GatewayError(Exception):
    """Base of every gateway failure; subclasses fix the status, the OpenAI ``type`` and ``code``."""

    status: ClassVar[int] = 500
    type_: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type_, param=self.param, code=self.code),
                            status_code=self.status, headers=self.headers)


class Unauthorized(GatewayError):
    """Missing, malformed or unknown bearer key (or a tenant key on an admin route)."""

    status, type_, code = 401, "invalid_request_error", "invalid_api_key"

    def __init__(self, message: str = "Invalid or missing API key. Send 'Authorization: Bearer <key>'."):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InvalidRequest(GatewayError):
    """The request is malformed or breaks a cap (max_tokens, n, prompt length, adapter name...)."""

    status, type_, code = 400, "invalid_request_error", "invalid_request"


class ModelNotFound(GatewayError):
    """The ``model`` is neither the base model nor one of the caller's adapters."""

    status, type_, code = 404, "invalid_request_error", "model_not_found"

    def __init__(self, name: str):
        super().__init__(f"The model `{name}` does not exist.", param="model")


class AdapterNotFound(GatewayError):
    """No adapter of that name for this tenant (whether missing or another tenant's: the same body)."""

    status, type_, code = 404, "invalid_request_error", "adapter_not_found"

    def __init__(self, name: str):
        super().__init__(f"The adapter `{name}` does not exist.", param="name")


class AdapterExists(GatewayError):
    """The tenant already has an adapter of that name."""

    status, type_, code = 409, "invalid_request_error", "adapter_exists"

    def __init__(self, name: str):
        super().__init__(f"An adapter named `{name}` already exists; delete it first or choose another name.",
                         param="name")


class TenantNotFound(GatewayError):
    status, type_, code = 404, "invalid_request_error", "tenant_not_found"

    def __init__(self, name: str):
        super().__init__(f"The tenant `{name}` does not exist.", param="name")


class TenantExists(GatewayError):
    status, type_, code = 409, "invalid_request_error", "tenant_exists"

    def __init__(self, name: str):
        super().__init__(f"A tenant named `{name}` already exists.", param="name")


class KeyNotFound(GatewayError):
    """The tenant has no API key of that id (revoked already, or another tenant's)."""

    status, type_, code = 404, "invalid_request_error", "key_not_found"

    def __init__(self, key_id: int):
        super().__init__(f"The tenant has no API key with id {key_id}.", param="key_id")


class PayloadTooLarge(GatewayError):
    """A request body or an uploaded file is over its limit."""

    status, type_, code = 413, "invalid_request_error", "payload_too_large"


class ConcurrencyLimited(GatewayError):
    """The tenant already has its maximum number of requests in flight."""

    status, type_, code = 429, "rate_limit_error", "concurrency_limit_exceeded"


class TokenRateLimited(GatewayError):
    """The tenant has used its tokens for the current minute."""

    status, type_, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UploadsBusy(GatewayError):
    """The tenant (or the whole gateway) already has its maximum number of uploads in progress."""

    status, type_, code = 429, "rate_limit_error", "too_many_uploads"

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "5"})


class AdapterQuotaExceeded(GatewayError):
    """Storing the adapter would take the tenant past its adapter count or stored bytes."""

    status, type_, code = 403, "invalid_request_error", "adapter_quota_exceeded"


class InsufficientStorage(GatewayError):
    """The adapter store's disk has too little free space left for an upload."""

    status, type_, code = 507, "server_error", "insufficient_storage"


class EngineUnavailable(GatewayError):
    """No engine replica could be reached (answered with ``Retry-After``: engines come back)."""

    status, type_, code = 503, "server_error", "engine_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 2):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class BaseModelUnavailable(GatewayError):
    """The base model's config.json (needed to validate uploads) cannot be read."""

    status, type_, code = 503, "server_error", "base_model_unavailable"


class EngineTimeout(GatewayError):
    """An engine took longer than the read timeout."""

    status, type_, code = 504, "server_error", "engine_timeout"


class EngineProtocolError(GatewayError):
    """An engine answered something that is not the OpenAI protocol (or the connection broke mid-answer)."""

    status, type_, code = 502, "server_error", "bad_engine_response"


#: flylora_runtime adapter errors -> HTTP status (default 400).
ADAPTER_ERROR_STATUS: dict[type[adapter_errors.AdapterError], int] = {adapter_errors.AdapterTooLarge: 413}


def adapter_error_response(exc: adapter_errors.AdapterError) -> JSONResponse:
    status = ADAPTER_ERROR_STATUS.get(type(exc), 400)
    code = "adapter_too_large" if status == 413 else "invalid_adapter"
    if isinstance(exc, adapter_errors.EngineLimitExceeded):
        code = "adapter_not_servable"
    return JSONResponse(error_body(str(exc), "invalid_request_error", param=exc.key, code=code), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure once."""

    async def on_gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    async def on_adapter_error(_request: Request, exc: adapter_errors.AdapterError) -> JSONResponse:
        return adapter_error_response(exc)

    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, "invalid_request_error", param=".".join(loc) or None,
                                       code="invalid_request"), status_code=400)

    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_, code=None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_client_gone(_request: Request, _exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it only ends the request cleanly.
        return JSONResponse(error_body("The client disconnected.", "invalid_request_error"), status_code=400)

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return internal_error_response()

    app.add_exception_handler(GatewayError, on_gateway_error)  # type: ignore[arg-type]
    app.add_exception_handler(adapter_errors.AdapterError, on_adapter_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, on_client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
