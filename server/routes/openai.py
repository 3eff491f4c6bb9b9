"""The OpenAI-compatible routes: the completion routes (one per entry of :data:`server.proxy.COMPLETION_ROUTES`,
all served by :func:`server.proxy.serve_completion`) and ``/v1/models``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from server.deps import GatewayDep, TenantDep
from server.proxy import COMPLETION_ROUTES, serve_completion

router = APIRouter(prefix="/v1", tags=["openai"])


def _body(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    common = {
        "model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 0}, "n": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["model", *required], "properties": {**common, **props},
        "additionalProperties": True}}}}}


#: The documented request body of each completion endpoint.
BODIES = {
    "chat.completions": _body(["messages"], {"messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}}}),
    "completions": _body(["prompt"], {"prompt": {"type": "string", "minLength": 1}}),
}


def _completion_route(endpoint: str) -> Callable[..., Awaitable[Response]]:
    async def completion(request: Request, gw: GatewayDep) -> Response:
        return await serve_completion(gw, endpoint, request.headers.get("authorization"),
                                      request.headers.get("content-length"), request.receive)

    completion.__name__ = endpoint.replace(".", "_")
    return completion


for _path, _endpoint in COMPLETION_ROUTES.items():
    router.add_api_route(_path.removeprefix(router.prefix), _completion_route(_endpoint), methods=["POST"],
                         openapi_extra=BODIES[_endpoint], response_model=None)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", response_model=ModelList)
async def models(tenant: TenantDep, gw: GatewayDep) -> Any:
    base = gw.settings.base_model_id
    adapters = await anyio.to_thread.run_sync(gw.registry.list_adapters, tenant.id)
    data = [ModelCard(id=base, created=0, owned_by="flylora", root=base, parent=None)]
    data += [ModelCard(id=a.name, created=a.created, owned_by=tenant.name, root=base, parent=base) for a in adapters]
    return ModelList(data=data)
