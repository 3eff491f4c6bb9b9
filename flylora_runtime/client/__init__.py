"""A small client for the gateway's own API: tenants (admin key), adapters (a tenant's key), readiness.

Completions go through the official ``openai`` client (``base_url=<gateway>/v1``); this covers the rest::

    from flylora_runtime.client import APIError, GatewayClient

    with GatewayClient("http://127.0.0.1:8000", admin_key) as admin:
        key = admin.create_tenant("acme")
    with GatewayClient("http://127.0.0.1:8000", key) as acme:
        acme.upload_adapter("support", "path/to/adapter")   # adapter_config.json + adapter_model.safetensors
        print([a["id"] for a in acme.list_adapters()])

One client can hold both keys: ``GatewayClient(url, tenant_key, admin_key=admin_key)`` sends the admin key on
the tenant and key routes and the tenant key on the adapter routes (with only ``api_key``, that key goes to
every route). The ``flylora`` command line (:mod:`flylora_runtime.client.cli`) is built on this client.

Every failure raises :class:`APIError`: the HTTP status and the gateway's OpenAI-shaped error (``message``,
``type``, ``code``, ``param``), or status ``None`` when no answer came: :class:`Unreachable` (connection
refused, timeout, broken connection) or :class:`MissingKey` (the route needs a key this client was not
given; nothing was sent). Torch-free (httpx).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _seg(name: str) -> str:
    """``name`` as one URL path segment (a ``/`` or ``..`` in it cannot reach another route)."""
    return quote(name, safe="") if name not in (".", "..") else quote(name, safe="").replace(".", "%2E")


class APIError(Exception):
    """A request to the gateway failed.

    Attributes: ``status`` (the HTTP status; ``None`` when no answer came), ``message``, ``type``, ``code``
    and ``param`` (the OpenAI error object's fields, ``None`` where the answer had none), ``method``, ``url``.
    """

    def __init__(self, status: int | None, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None, method: str = "", url: str = ""):
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.method, self.url = method, url
        where = f"{method} {url}: " if method else ""
        what = f"HTTP {status}" if status is not None else "no answer"
        label = f" ({code})" if code else (f" ({type})" if type else "")
        super().__init__(f"{where}{what}{label}: {message}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        err: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                err = body["error"]
        except ValueError:
            pass
        message = str(err.get("message") or response.text[:500] or response.reason_phrase)
        return cls(response.status_code, message, type=err.get("type"), code=err.get("code"),
                   param=err.get("param"), method=response.request.method, url=str(response.request.url))

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"message", "type", "param", "code"}``."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class Unreachable(APIError):
    """No HTTP answer: connection refused, DNS failure, timeout, broken connection (``status`` is ``None``)."""


class MissingKey(APIError):
    """The route needs a key this client was not given; nothing was sent. ``admin``: whether it is the admin
    key (tenant and key routes) or a tenant key (adapter routes)."""

    def __init__(self, admin: bool, *, method: str = "", url: str = ""):
        self.admin = admin
        which = "the admin key (admin_key=)" if admin else "a tenant key (api_key=)"
        super().__init__(None, f"this call needs {which}", method=method, url=url)


class _Progress:
    """A read-only file that reports the bytes read from it (httpx streams multipart files with ``read``)."""

    def __init__(self, fh: BinaryIO, on_bytes: Callable[[int], None]):
        self.fh, self.on_bytes = fh, on_bytes

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


class GatewayClient:
    """The gateway's tenant and adapter API. ``api_key``: the key sent on every route (the admin key for the
    tenant and key calls, a tenant's key for the adapter calls); ``admin_key``: the admin key, sent on the
    tenant and key routes in place of ``api_key``. A call whose route has no key raises :class:`MissingKey`.
    ``timeout``: seconds for an answer (``upload_timeout`` for uploads; connecting takes at most
    ``connect_timeout``). Thread-safe (one connection pool); close it, or use it as a context manager."""

    def __init__(self, base_url: str, api_key: str | None = None, *, admin_key: str | None = None,
                 timeout: float = 60.0, upload_timeout: float = 600.0, connect_timeout: float = 10.0,
                 user_agent: str = "flylora-client", trust_env: bool = True,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key or None, admin_key or None
        self._upload_timeout = httpx.Timeout(upload_timeout, connect=min(connect_timeout, upload_timeout))
        self._options = {"timeout": timeout, "upload_timeout": upload_timeout, "connect_timeout": connect_timeout,
                         "user_agent": user_agent, "trust_env": trust_env, "transport": transport}
        self._http = httpx.Client(base_url=self.base_url, headers={"user-agent": user_agent},
                                  timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
                                  trust_env=trust_env, transport=transport)

    def with_key(self, api_key: str) -> GatewayClient:
        """A new client for the same gateway with another key, and only that key (close it too)."""
        return GatewayClient(self.base_url, api_key, **self._options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> httpx.Response:
        key = (self.admin_key or self.api_key) if admin else self.api_key
        if key is None:
            raise MissingKey(admin, method=method, url=self.base_url + path)
        try:
            response = self._http.request(method, path, headers={"authorization": f"Bearer {key}"}, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unreachable(None, f"no answer from the gateway at {self.base_url} in time ({type(exc).__name__})",
                              method=method, url=self.base_url + path) from exc
        except httpx.RequestError as exc:
            raise Unreachable(None, f"cannot reach the gateway at {self.base_url} ({type(exc).__name__}: {exc})",
                              method=method, url=self.base_url + path) from exc
        if response.status_code >= 400:
            raise APIError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON; an :class:`APIError` (code ``bad_response``) when it is not JSON."""
        response = self._call(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise APIError(response.status_code, f"expected JSON, got {response.headers.get('content-type')!r}",
                           code="bad_response", method=method, url=str(response.request.url)) from None

    # --- readiness (no key) --------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether the gateway answers and at least one engine is up (``GET /ready`` is 200)."""
        try:
            return self._http.get("/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 300.0, *, interval: float = 0.5,
                   progress: Callable[[str], None] | None = None) -> float:
        """Wait until ``/ready`` answers 200 (seconds waited); ``TimeoutError`` after ``timeout``.
        (Processes this program started wait with :func:`flylora_runtime.engine.process.wait_http`, which
        also notices when they exit.)"""
        t0 = last = time.monotonic()
        while not self.ready():
            now = time.monotonic()
            if now - t0 > timeout:
                raise TimeoutError(f"the gateway at {self.base_url} is not ready after {timeout:.0f} s")
            if progress is not None and now - last >= 15:
                progress(f"still waiting for the gateway ({now - t0:.0f} s) ...")
                last = now
            time.sleep(interval)
        return time.monotonic() - t0

    # --- tenants and their keys (admin key) ---------------------------------------------------------------
    def new_tenant(self, name: str, *, max_concurrency: int | None = None,
                   tokens_per_minute: int | None = None) -> dict[str, Any]:
        """Create tenant ``name``; returns ``{"name", "api_key", "key_id"}`` (the key shown once). 409 when it
        exists."""
        body: dict[str, Any] = {"name": name}
        if max_concurrency is not None:
            body["max_concurrency"] = max_concurrency
        if tokens_per_minute is not None:
            body["tokens_per_minute"] = tokens_per_minute
        return self._json("POST", "/admin/tenants", admin=True, json=body)

    def create_tenant(self, name: str, *, max_concurrency: int | None = None,
                      tokens_per_minute: int | None = None) -> str:
        """Create tenant ``name``; returns its API key (shown once). 409 when it exists."""
        return self.new_tenant(name, max_concurrency=max_concurrency, tokens_per_minute=tokens_per_minute)["api_key"]

    def new_key(self, tenant: str, *, label: str | None = None) -> dict[str, Any]:
        """A new API key for an existing tenant (its other keys stay valid): ``{"name", "api_key", "key_id"}``.
        ``label``: what the key is for, shown in :meth:`list_keys`."""
        return self._json("POST", f"/admin/tenants/{_seg(tenant)}/keys", admin=True,
                          json={"label": label} if label else None)

    def issue_key(self, tenant: str) -> str:
        """A new API key for an existing tenant (its other keys stay valid)."""
        return self.new_key(tenant)["api_key"]

    def list_keys(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's keys, oldest first: ``{"id", "created", "label", "hint"}`` (never the keys)."""
        return self._json("GET", f"/admin/tenants/{_seg(tenant)}/keys", admin=True)["data"]

    def revoke_key(self, tenant: str, key_id: int) -> None:
        """Revoke one key by id; the tenant, its adapters and its other keys stay."""
        self._call("DELETE", f"/admin/tenants/{_seg(tenant)}/keys/{int(key_id)}", admin=True)

    def ensure_tenant(self, name: str, **limits: int | None) -> tuple[str, bool]:
        """(key, created): the tenant is created, or, when it exists, issued a new key (keys are shown once)."""
        try:
            return self.create_tenant(name, **limits), True
        except APIError as exc:
            if exc.status != 409:
                raise
        return self.issue_key(name), False

    def list_tenants(self) -> list[dict[str, Any]]:
        return self._json("GET", "/admin/tenants", admin=True)["data"]

    def delete_tenant(self, name: str) -> None:
        self._call("DELETE", f"/admin/tenants/{_seg(name)}", admin=True)

    # --- adapters (a tenant's key) -------------------------------------------------------------------------
    def upload_adapter(self, name: str, folder: str | os.PathLike, *,
                       on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload the adapter in ``folder`` (``adapter_config.json`` + ``adapter_model.safetensors``, streamed
        from disk) as ``name``; returns the adapter object. 409 when the name is taken. ``on_bytes(n)`` is
        called as each piece of the weights file is sent (a progress bar's update)."""
        folder = Path(folder)
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / file).is_file():
                raise FileNotFoundError(f"{folder} is not an adapter folder: {file} is missing")
        with open(folder / CONFIG_NAME, "rb") as config, open(folder / WEIGHTS_NAME, "rb") as weights:
            stream: Any = weights if on_bytes is None else _Progress(weights, on_bytes)
            files = {"config": (CONFIG_NAME, config, "application/json"),
                     "weights": (WEIGHTS_NAME, stream, "application/octet-stream")}
            return self._json("POST", "/v1/adapters", data={"name": name}, files=files,
                              timeout=self._upload_timeout)

    def upload_adapters(self, adapters: Iterable[tuple[str, str | os.PathLike]], *, parallel: int = 1
                        ) -> list[dict[str, Any]]:
        """Upload (name, folder) pairs, ``parallel`` at a time; the adapter objects in the same order."""
        items = list(adapters)
        with ThreadPoolExecutor(max(1, parallel)) as pool:
            return list(pool.map(lambda item: self.upload_adapter(*item), items))

    def ensure_adapter(self, name: str, folder: str | os.PathLike) -> tuple[dict[str, Any], bool]:
        """(adapter, uploaded): uploaded unless the tenant already has an adapter called ``name``."""
        try:
            return self.get_adapter(name), False
        except APIError as exc:
            if exc.status != 404:
                raise
        return self.upload_adapter(name, folder), True

    def list_adapters(self, *, page_size: int = 1000) -> list[dict[str, Any]]:
        """Every adapter of the tenant, by name (the gateway's pages followed to the end)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": page_size}
        while True:
            page = self._json("GET", "/v1/adapters", params=params)
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                return out
            params = {"limit": page_size, "after": page["data"][-1]["id"]}

    def get_adapter(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/adapters/{_seg(name)}")

    def delete_adapter(self, name: str) -> None:
        self._call("DELETE", f"/v1/adapters/{_seg(name)}")
