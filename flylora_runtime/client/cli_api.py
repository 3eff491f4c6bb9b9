"""The gateway's HTTP API as plain calls (httpx), for the command line.

One method per route; each returns the decoded JSON (None for 204) or raises :class:`ApiError` (the gateway
answered with an error: status and OpenAI error object) or :class:`Unreachable` (no answer at all). The
admin routes send the admin key, the tenant routes the tenant key; a missing key is :class:`MissingKey`
before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class ApiError(Exception):
    """The gateway refused the request; ``error`` is its OpenAI-style error object."""

    def __init__(self, status: int, error: dict[str, Any]):
        self.status = status
        self.error = error
        super().__init__(error.get("message") or f"HTTP {status}")


class Unreachable(Exception):
    """No HTTP answer: connection refused, DNS failure, timeout, broken connection."""


class MissingKey(Exception):
    """The command needs a key that was neither given nor set in the environment."""


class _Progress:
    """A read-only file wrapper that reports bytes read (httpx streams multipart files with ``read``)."""

    def __init__(self, fh: BinaryIO, on_bytes: Callable[[int], None]):
        self.fh = fh
        self.on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.on_bytes(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def fileno(self) -> int:  # lets httpx learn the size, so the upload has a Content-Length
        return self.fh.fileno()


class Gateway:
    """A client of one gateway. ``api_key``: a tenant key; ``admin_key``: the admin key."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_key = admin_key
        self.http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0),
                                 headers={"user-agent": "flylora-cli"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, admin: bool, **kwargs: Any) -> Any:
        key = self.admin_key if admin else self.api_key
        if not key:
            which = "the admin key (--admin-key or FLYLORA_ADMIN_KEY)" if admin else \
                "a tenant key (--api-key or FLYLORA_API_KEY)"
            raise MissingKey(f"this command needs {which}")
        try:
            r = self.http.request(method, path, headers={"authorization": f"Bearer {key}"}, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unreachable(f"no answer from {self.base_url} in time ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach {self.base_url}: {exc or type(exc).__name__}") from None
        if r.status_code == 204:
            return None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if not isinstance(error, dict):
                error = {"message": f"HTTP {r.status_code}: {r.text[:200]}", "type": None, "param": None,
                         "code": None}
            raise ApiError(r.status_code, error)
        if body is None:
            raise ApiError(r.status_code, {"message": f"expected JSON, got {r.headers.get('content-type')!r}",
                                           "type": None, "param": None, "code": "bad_response"})
        return body

    # --- admin: tenants and keys ------------------------------------------------------------------------------
    def create_tenant(self, name: str, *, max_concurrency: int | None = None,
                      tokens_per_minute: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if max_concurrency is not None:
            body["max_concurrency"] = max_concurrency
        if tokens_per_minute is not None:
            body["tokens_per_minute"] = tokens_per_minute
        return self._call("POST", "/admin/tenants", admin=True, json=body)

    def list_tenants(self) -> dict[str, Any]:
        return self._call("GET", "/admin/tenants", admin=True)

    def delete_tenant(self, name: str) -> None:
        self._call("DELETE", f"/admin/tenants/{_segment(name)}", admin=True)

    def new_key(self, tenant: str, *, label: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/admin/tenants/{_segment(tenant)}/keys", admin=True,
                          json={"label": label} if label else None)

    def list_keys(self, tenant: str) -> dict[str, Any]:
        return self._call("GET", f"/admin/tenants/{_segment(tenant)}/keys", admin=True)

    def revoke_key(self, tenant: str, key_id: int) -> None:
        self._call("DELETE", f"/admin/tenants/{_segment(tenant)}/keys/{int(key_id)}", admin=True)

    # --- tenant: adapters -------------------------------------------------------------------------------------
    def upload_adapter(self, name: str, config: Path, weights: Path, *,
                       on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload ``adapter_config.json`` + ``adapter_model.safetensors`` (streamed from disk)."""
        with open(config, "rb") as cfh, open(weights, "rb") as wfh:
            stream: Any = wfh if on_bytes is None else _Progress(wfh, on_bytes)
            files = {"config": (CONFIG_NAME, cfh, "application/json"),
                     "weights": (WEIGHTS_NAME, stream, "application/octet-stream")}
            return self._call("POST", "/v1/adapters", admin=False, data={"name": name}, files=files)

    def list_adapters(self) -> dict[str, Any]:
        return self._call("GET", "/v1/adapters", admin=False)

    def get_adapter(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/adapters/{_segment(name)}", admin=False)

    def delete_adapter(self, name: str) -> None:
        self._call("DELETE", f"/v1/adapters/{_segment(name)}", admin=False)


def _segment(value: str) -> str:
    """``value`` as one URL path segment (names are checked before; this keeps ``/`` from reaching the path)."""
    return quote(value, safe="")


def environment_defaults() -> dict[str, str | None]:
    """Base URL and keys from the environment (``FLYLORA_BASE_URL``, ``FLYLORA_API_KEY``, ``FLYLORA_ADMIN_KEY``)."""
    return {"base_url": os.environ.get("FLYLORA_BASE_URL") or DEFAULT_BASE_URL,
            "api_key": os.environ.get("FLYLORA_API_KEY") or None,
            "admin_key": os.environ.get("FLYLORA_ADMIN_KEY") or None}
