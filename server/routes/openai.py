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
from server.request_policy import RequestPolicy

router = APIRouter(prefix="/v1", tags=["openai"])


#: The request body of each completion endpoint in the OpenAPI document: the request policy's models, with the
#: app's caps (filled in by :func:`document_completion_bodies` when the document is built).
BODY_PLACEHOLDER: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object"}}}}}


def document_completion_bodies(schema: dict[str, Any], policy: RequestPolicy) -> None:
    """Put the policy's request models into an OpenAPI document (bodies and their component schemas)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, endpoint in COMPLETION_ROUTES.items():
        body, defs = policy.schema(endpoint, ref_template="#/components/schemas/{model}")
        components.update(defs)
        components[body["title"]] = body
        operation = schema["paths"][path]["post"]
        operation["requestBody"]["content"]["application/json"]["schema"] = {
            "$ref": f"#/components/schemas/{body['title']}"}


def _completion_route(endpoint: str) -> Callable[..., Awaitable[Response]]:
    async def completion(request: Request, gw: GatewayDep) -> Response:
        return await serve_completion(gw, endpoint, request.headers.get("authorization"),
                                      request.headers.get("content-length"), request.receive)

    completion.__name__ = endpoint.replace(".", "_")
    return completion


for _path, _endpoint in COMPLETION_ROUTES.items():
    router.add_api_route(_path.removeprefix(router.prefix), _completion_route(_endpoint), methods=["POST"],
                         openapi_extra=BODY_PLACEHOLDER, response_model=None)


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
