"""The hub's HTTP API (FastAPI), versioned under /v1. Every route is a thin skin over
`HubService`; errors map to status codes in one place (`_error_status`).

All routes are `async def` so that the SQLite connection is used from the event loop's
thread only; the work behind each request is small (a model is kilobytes to megabytes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from aipipe import __version__
from aipipe.audit.log import AuditLog
from aipipe.cds import JwtPolicy, cds_router
from aipipe.errors import (
    AipipeError,
    AuthError,
    ConflictError,
    NotFoundError,
    StudyError,
    UpdateRejectedError,
)
from aipipe.hub.cds import HubCdsProvider
from aipipe.hub.home import HubPaths
from aipipe.hub.service import HubService, Principal
from aipipe.secure.identity import Identity
from aipipe.wire import (
    Decline,
    EnrolRequest,
    EnrolResponse,
    EvalReport,
    FeatureStats,
    ModelVersionInfo,
    RoundInfo,
    RoundOpen,
    StudyInfo,
    StudyPublish,
    UpdateReceipt,
    WorkItem,
)
from aipipe.wire.frames import MEDIA_TYPE

MAX_UPDATE_BYTES = 256 * 1024 * 1024
TICK_S = 0.5
LONG_POLL_STEP_S = 0.2


def _error_status(exc: AipipeError) -> int:
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError | UpdateRejectedError):
        return 409
    if isinstance(exc, StudyError):
        return 422
    return 400


def create_app(paths: HubPaths) -> FastAPI:
    """The ASGI app for one hub home."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        identity = Identity.load(paths.identity_key)
        store = paths.open_store()
        audit = AuditLog.open(paths.audit_log, identity, owner=f"hub/{paths.config.name}")
        service = HubService(paths, store, audit, identity)
        app.state.service = service
        service.tick()  # resume rounds a previous process left behind
        app.include_router(_cds(paths, service, audit))
        ticker = asyncio.create_task(_tick_forever(service))
        try:
            yield
        finally:
            ticker.cancel()
            audit.close()
            store.close()

    app = FastAPI(title="aipipe hub", version=__version__, lifespan=lifespan)

    @app.exception_handler(AipipeError)
    async def _aipipe_error(request: Request, exc: AipipeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_error_status(exc))

    _routes(app)
    return app


def _cds(paths: HubPaths, service: HubService, audit: AuditLog) -> APIRouter:
    """CDS Hooks at /cds-services; CDS clients must present a JWT when hub.yaml lists any."""
    clients = paths.config.cds_clients
    policy = JwtPolicy(clients, base_url=paths.config.cds_base_url) if clients else None
    key = service.identity.sign(b"aipipe-cds-pseudonym-key")[:32]
    return cds_router(HubCdsProvider(service), audit=audit, jwt=policy, pseudonym_key=key)


async def _tick_forever(service: HubService) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        service.tick()


def _service(request: Request) -> HubService:
    service: HubService = request.app.state.service
    return service


def _principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
    return _service(request).authenticate(token)


def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if principal.kind != "admin":
        raise AuthError("this needs the hub's admin token")
    return principal


def _node(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if principal.kind != "node":
        raise AuthError("this needs a node credential")
    return principal


Svc = Annotated[HubService, Depends(_service)]
Admin = Annotated[Principal, Depends(_admin)]
Node = Annotated[Principal, Depends(_node)]
Anyone = Annotated[Principal, Depends(_principal)]


def _routes(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post("/v1/enrol")
    async def enrol(body: EnrolRequest, service: Svc) -> EnrolResponse:
        return service.enrol(body)

    @app.get("/v1/nodes")
    async def nodes(service: Svc, _: Admin) -> list[dict[str, str | None]]:
        return [
            {
                "name": r["name"],
                "state": r["state"],
                "enrolled_at": r["enrolled_at"],
                "last_seen": r["last_seen"],
                "public_key": r["public_key"],
            }
            for r in service.store.nodes()
        ]

    @app.post("/v1/studies")
    async def publish(body: StudyPublish, service: Svc, _: Admin) -> StudyInfo:
        return service.publish(body.spec)

    @app.get("/v1/studies/{study}")
    async def study(study: str, service: Svc, _: Anyone) -> StudyInfo:
        return service.study_info(study)

    @app.post("/v1/studies/{study}/rounds")
    async def open_round(study: str, body: RoundOpen, service: Svc, _: Admin) -> RoundInfo:
        return service.open_round(study, body.deadline_s)

    @app.get("/v1/studies/{study}/rounds")
    async def rounds(study: str, service: Svc, _: Anyone) -> list[RoundInfo]:
        return [service.round_info(study, r.round) for r in service.store.rounds(study)]

    @app.get("/v1/studies/{study}/rounds/{number}")
    async def round_info(study: str, number: int, service: Svc, _: Anyone) -> RoundInfo:
        return service.round_info(study, number)

    @app.post("/v1/studies/{study}/rounds/{number}/updates")
    async def upload(
        study: str, number: int, request: Request, service: Svc, node: Node
    ) -> UpdateReceipt:
        if request.headers.get("content-type") != MEDIA_TYPE:
            service.refuse_update(node.name, study, number, f"updates are sent as {MEDIA_TYPE}")
        body = await request.body()
        if len(body) > MAX_UPDATE_BYTES:
            service.refuse_update(
                node.name, study, number, f"update of {len(body)} bytes is too large"
            )
        return service.receive_update(node.name, study, number, body)

    @app.post("/v1/studies/{study}/rounds/{number}/decline")
    async def decline(
        study: str, number: int, body: Decline, service: Svc, node: Node
    ) -> dict[str, bool]:
        service.decline(node.name, study, number, body.reason, body.exclude)
        return {"ok": True}

    @app.post("/v1/studies/{study}/stats")
    async def stats(study: str, body: FeatureStats, service: Svc, node: Node) -> dict[str, bool]:
        service.report_stats(node.name, study, body)
        return {"ok": True}

    @app.get("/v1/work")
    async def work(
        service: Svc, node: Node, wait: Annotated[float, Query(ge=0, le=60)] = 0
    ) -> WorkItem:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            item = service.work_for(node.name)
            if item.kind != "idle" or asyncio.get_running_loop().time() >= deadline:
                return item
            await asyncio.sleep(LONG_POLL_STEP_S)

    @app.get("/v1/models")
    async def models(service: Svc, _: Anyone, study: str | None = None) -> list[ModelVersionInfo]:
        return [service.model_info(r["version"]) for r in service.store.models(study)]

    @app.get("/v1/models/{version}")
    async def model(version: str, service: Svc, _: Anyone) -> ModelVersionInfo:
        return service.model_info(version)

    @app.get("/v1/models/{version}/weights")
    async def weights(version: str, service: Svc, _: Anyone) -> Response:
        return Response(service.model_weights(version), media_type="application/octet-stream")

    @app.post("/v1/models/{version}/metrics")
    async def metrics(version: str, body: EvalReport, service: Svc, node: Node) -> dict[str, bool]:
        if body.version != version:
            raise ConflictError("report names another version than the URL")
        service.report_metrics(node.name, body)
        return {"ok": True}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(service: Svc) -> str:
        return service.prometheus_text()
