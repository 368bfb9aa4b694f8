"""Health, enrolment, and the admin's list of nodes."""

from __future__ import annotations

from fastapi import APIRouter

from aipipe import __version__
from aipipe.hub.routes.deps import Admin, Svc
from aipipe.wire import EnrolRequest, EnrolResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.post("/v1/enrol")
async def enrol(body: EnrolRequest, service: Svc) -> EnrolResponse:
    return service.enrol(body)


@router.get("/v1/nodes")
async def nodes(service: Svc, _: Admin) -> list[dict[str, str | float | None]]:
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
