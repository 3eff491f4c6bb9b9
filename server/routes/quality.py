"""``/v1/adapters/{name}/quality``: an adapter's unlabelled quality figures, its calibration, its reference.

Tenant-scoped like every adapter route: another tenant's adapter is the same 404 as a missing one. The base
model's name gives the caller's own base-model window. Figures: see :mod:`server.quality`.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request

from server.adapters import resolve_adapter
from server.deps import GatewayDep, TenantDep
from server.errors import AdapterNotFound, GatewayError, InvalidRequest, PayloadTooLarge
from server.quality import Calibration, fit_line, mde
from server.quality_store import base_subject
from server.registry import Tenant
from server.gateway import Gateway

router = APIRouter(prefix="/v1/adapters", tags=["quality"])
MAX_CALIBRATION_POINTS = 1000


class QualityDisabled(GatewayError):
    status, type_, code = 503, "server_error", "quality_monitoring_disabled"


class WindowNotFull(GatewayError):
    status, type_, code = 409, "invalid_request_error", "quality_window_not_full"


async def _subject(gw: Gateway, tenant: Tenant, name: str) -> tuple[str, str]:
    """(subject, public name) of the caller's adapter or base model; 404 otherwise."""
    if gw.quality is None:
        raise QualityDisabled("Quality monitoring is off on this gateway (FLYLORA_QUALITY_ENABLED=false).")
    if name == gw.settings.base_model_id:
        return base_subject(tenant.id), name
    adapter = await resolve_adapter(gw, tenant, name)
    if adapter is None:
        raise AdapterNotFound(name)
    return adapter.internal_id, name


async def _read_json(request: Request, limit: int) -> Any:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None


def _response(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {"object": "adapter.quality", "id": name, **summary}


QUALITY_RESPONSE = {"responses": {"200": {"description": "The adapter's quality figures", "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "object": {"type": "string", "enum": ["adapter.quality"]}, "id": {"type": "string"},
        "window": {"type": "object"}, "mean_energy": {"type": ["number", "null"]},
        "mde": {"type": ["number", "null"]}, "drift": {"type": ["object", "null"]},
        "estimated_accuracy": {"type": ["number", "null"]}}}}}}}}

CALIBRATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "description": "Either `points` (MDE of a set of N requests, measured by this gateway, and that set's "
                   "accuracy) or `sets` (the N per-request energies of each labelled set and its accuracy).",
    "properties": {
        "points": {"type": "array", "minItems": 2, "maxItems": MAX_CALIBRATION_POINTS, "items": {
            "type": "object", "required": ["mde", "accuracy"],
            "properties": {"mde": {"type": "number"}, "accuracy": {"type": "number", "minimum": 0, "maximum": 1}}}},
        "sets": {"type": "array", "minItems": 2, "maxItems": MAX_CALIBRATION_POINTS, "items": {
            "type": "object", "required": ["energies", "accuracy"],
            "properties": {"energies": {"type": "array", "items": {"type": "number"}},
                           "accuracy": {"type": "number", "minimum": 0, "maximum": 1}}}},
    }}}}}}


@router.get("/{name}/quality", openapi_extra=QUALITY_RESPONSE, response_model=None)
async def get_quality(name: str, tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    subject, public = await _subject(gw, tenant, name)
    return _response(public, await anyio.to_thread.run_sync(gw.quality.store.summary, subject))


def _number(value: Any, param: str, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"`{param}` must be a finite number.", param=param)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequest(f"`{param}` must be between {low} and {high}, found {value}.", param=param)
    return float(value)


def parse_calibration(body: Any, window_size: int) -> list[tuple[float, float]]:
    """The (MDE, accuracy) pairs of a calibration request; 400 for anything malformed."""
    if not isinstance(body, dict) or (("points" in body) == ("sets" in body)):
        raise InvalidRequest("Send either `points` ([{mde, accuracy}]) or `sets` ([{energies, accuracy}]).")
    key = "points" if "points" in body else "sets"
    items = body[key]
    if not isinstance(items, list) or not 2 <= len(items) <= MAX_CALIBRATION_POINTS:
        raise InvalidRequest(f"`{key}` must be a list of 2 to {MAX_CALIBRATION_POINTS} items.", param=key)
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequest(f"`{key}[{i}]` must be an object.", param=key)
        accuracy = _number(item.get("accuracy"), f"{key}[{i}].accuracy", low=0.0, high=1.0)
        if key == "points":
            pairs.append((_number(item.get("mde"), f"{key}[{i}].mde"), accuracy))
            continue
        energies = item.get("energies")
        if not isinstance(energies, list) or len(energies) != window_size:
            raise InvalidRequest(f"`sets[{i}].energies` must list exactly {window_size} per-request energies (the "
                                 "window size: MDE depends on the number of requests).", param=key)
        pairs.append((mde([_number(e, f"sets[{i}].energies") for e in energies]), accuracy))
    if len({x for x, _ in pairs}) < 2:
        raise InvalidRequest("The MDE values are all equal; a line cannot be fitted.", param=key)
    return pairs


@router.post("/{name}/quality/calibrate", openapi_extra={**CALIBRATE_BODY, **QUALITY_RESPONSE}, response_model=None)
async def calibrate(name: str, request: Request, tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    """Fit ``accuracy = slope * MDE + intercept`` on labelled sets (the paper's linear map)."""
    subject, public = await _subject(gw, tenant, name)
    body = await _read_json(request, gw.settings.max_request_bytes)
    window = gw.quality.store.window_size
    pairs = parse_calibration(body, window)
    slope, intercept, r2 = fit_line([x for x, _ in pairs], [y for _, y in pairs])
    fit = Calibration(slope=slope, intercept=intercept, r2=r2, points=len(pairs), window_size=window,
                      fitted=int(time.time()))
    store = gw.quality.store
    await anyio.to_thread.run_sync(
        lambda: store.set_calibration(subject, tenant.id, tenant.name, public, fit))
    return _response(public, await anyio.to_thread.run_sync(store.summary, subject))


@router.post("/{name}/quality/reference", openapi_extra=QUALITY_RESPONSE, response_model=None)
async def pin_reference(name: str, tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    """Make the current (full) window the reference that drift is measured against."""
    subject, public = await _subject(gw, tenant, name)
    store = gw.quality.store
    energies = await anyio.to_thread.run_sync(store.window_energies, subject)
    if len(energies) < store.window_size:
        raise WindowNotFull(f"The quality window holds {len(energies)} of {store.window_size} requests; a "
                            "reference needs a full window.")
    await anyio.to_thread.run_sync(store.pin_reference, subject, energies)
    return _response(public, await anyio.to_thread.run_sync(store.summary, subject))
