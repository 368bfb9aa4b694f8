"""Health (liveness and readiness), enrolment, a node's client certificate renewal, and the
admin's list of nodes."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from aipipe import __version__
from aipipe.hub.metrics import unready_reason
from aipipe.hub.routes.deps import Node, Overseer, Svc
from aipipe.wire import ClientCert, ClientCertRequest, EnrolRequest, EnrolResponse

router = APIRouter()


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    version: str


class NotReady(BaseModel):
    status: Literal["unready"] = "unready"
    reason: str


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers (it reads nothing)."""
    return {"status": "ok", "version": __version__}


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": NotReady, "description": "Not ready to serve, and why"}},
)
async def readyz(service: Svc) -> JSONResponse:
    """Readiness: the store answers a query and the audit log is open and writable."""
    reason = unready_reason(service.store, service.audit)
    if reason is not None:
        return JSONResponse(NotReady(reason=reason).model_dump(), status_code=503)
    return JSONResponse(Ready(version=__version__).model_dump())


@router.post("/v1/enrol")
async def enrol(body: EnrolRequest, service: Svc) -> EnrolResponse:
    return service.enrol(body)


@router.post("/v1/node/certificate")
async def node_certificate(body: ClientCertRequest, service: Svc, node: Node) -> ClientCert:
    """A new TLS client certificate for the calling node, for the key of its CSR (CN = its
    name; under mutual TLS the call itself needs its current certificate)."""
    return service.client_certs.renew(node.name, body.csr)


@router.get("/v1/nodes")
async def nodes(service: Svc, _: Overseer) -> list[dict[str, str | float | None]]:
    return [
        {
            "name": r["name"],
            "state": r["state"],
            "enrolled_at": r["enrolled_at"],
            "last_seen": r["last_seen"],
            "public_key": r["public_key"],
            "reputation": service.store.reputation(r["name"]),  # 1 until `detection` screens it
        }
        for r in service.store.nodes()
    ]
