"""Model versions, their weights and the nodes' evaluation reports; the hub's Prometheus
counters."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from aipipe.errors import ConflictError
from aipipe.hub.metrics import CONTENT_TYPE
from aipipe.hub.routes.deps import Monitor, Node, Notify, Reader, Svc, Weights, binary
from aipipe.wire import EvalReport, ModelVersionInfo

router = APIRouter()


@router.get("/v1/models")
async def models(service: Svc, who: Reader, study: str | None = None) -> list[ModelVersionInfo]:
    return service.access.models(who, study)


@router.get("/v1/models/{version}")
async def model(version: str, service: Svc, who: Reader) -> ModelVersionInfo:
    return service.access.model(who, version)


@router.get("/v1/models/{version}/weights", responses=binary("application/octet-stream"))
async def weights(version: str, service: Svc, who: Weights) -> Response:
    return Response(service.access.weights(who, version), media_type="application/octet-stream")


@router.post("/v1/models/{version}/metrics")
async def metrics(
    version: str, body: EvalReport, service: Svc, changes: Notify, node: Node
) -> dict[str, bool]:
    if body.version != version:
        raise ConflictError("report names another version than the URL")
    service.report_metrics(node.name, body)
    changes.notify()
    return {"ok": True}


@router.get("/metrics", responses=binary("text/plain"))
async def prometheus(service: Svc, _: Monitor) -> Response:
    """Prometheus' text format (`aipipe.hub.metrics`), for the admin token."""
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)
