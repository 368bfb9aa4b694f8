"""The hub's HTTP API (FastAPI), versioned under /v1. Every route is a thin skin over
`HubService`; an `AipipeError` answers its class's `http_status` with `error_body` (the table
in `aipipe.errors`).

All routes are `async def` so that the SQLite connection is used from the event loop's
thread only; the work behind each request is small (a model is kilobytes to megabytes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from aipipe import __version__
from aipipe.audit.log import AuditLog
from aipipe.cds import JwtPolicy, cds_router
from aipipe.cds.links import load_link_key
from aipipe.errors import AipipeError, AuthError, ConflictError, error_body
from aipipe.hub.audit_head import AuditHeadMiddleware
from aipipe.hub.cds import HubCdsProvider, hub_fhir_access
from aipipe.hub.home import HubPaths
from aipipe.hub.limits import MAX_KEYS_BYTES, MAX_UPDATE_BYTES, RequestGuard, Scope
from aipipe.hub.openapi import CDS_RESPONSES, ERROR_RESPONSES, add_docs, validation_error
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
from aipipe.wire.secure import CkksKeyInfo, Keyring, SecAggRoundConfig

MAX_ROUND = 2**31 - 1  # path integers past this are refused (422), not overflowed (500)
TICK_S = 0.5
LONG_POLL_STEP_S = 0.2


def create_app(paths: HubPaths) -> FastAPI:
    """The ASGI app for one hub home."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        identity = Identity.load(paths.identity_key)
        store = paths.open_store()
        audit = AuditLog.open(paths.audit_log, identity, owner=f"hub/{paths.config.name}")
        service = HubService(paths, store, audit, identity)
        app.state.service = service
        app.state.audit = audit  # its latest signed head goes out on every response
        app.state.changes = changes = Changes()
        service.tick()  # resume rounds a previous process left behind
        app.include_router(_cds(paths, service, audit), responses=CDS_RESPONSES)
        ticker = asyncio.create_task(_tick_forever(service, changes))
        try:
            yield
        finally:
            ticker.cancel()
            audit.close()  # signs the head: nothing after the last checkpoint is left unsigned
            store.close()

    app = FastAPI(
        title="aipipe hub",
        version=__version__,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by add_docs
    )
    app.add_middleware(AuditHeadMiddleware)

    @app.exception_handler(AipipeError)
    async def _aipipe_error(request: Request, exc: AipipeError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.http_status)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(RequestGuard, authenticate=_guard_authenticate)
    add_docs(app, paths.config)
    _routes(app)
    _secure_routes(app)
    return app


def _guard_authenticate(scope: Scope, token: str | None) -> Principal:
    """The token check `RequestGuard` runs before a body is read."""
    service: HubService = scope["app"].state.service
    return service.authenticate(token)


def _cds(paths: HubPaths, service: HubService, audit: AuditLog) -> APIRouter:
    """CDS Hooks at /cds-services: clients present a JWT (hub.yaml cds_clients) unless
    cds_allow_unauthenticated; fhirServers are read only from cds_fhir_servers. Model card links
    are signed with <home>/cds-link.key (made here at first serve)."""
    clients = paths.config.cds_clients
    policy = JwtPolicy(clients, base_url=paths.config.cds_base_url) if clients else None
    key = service.identity.sign(b"aipipe-cds-pseudonym-key")[:32]
    return cds_router(HubCdsProvider(service), audit=audit, jwt=policy, pseudonym_key=key,
                      fhir=hub_fhir_access(paths),
                      allow_unauthenticated=paths.config.cds_allow_unauthenticated,
                      base_url=paths.config.cds_base_url,
                      link_key=load_link_key(paths.cds_link_key),
                      link_lifetime_s=paths.config.cds_link_lifetime_s)  # fmt: skip


class Changes:
    """Wakes long-polls when this process changes round state.

    Only a wake-up: waiters re-read the store and still poll it every LONG_POLL_STEP_S, so a
    change made by another hub replica is seen too, just later.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


async def _tick_forever(service: HubService, changes: Changes) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        if service.tick():
            changes.notify()


def _changes(request: Request) -> Changes:
    changes: Changes = request.app.state.changes
    return changes


def _service(request: Request) -> HubService:
    service: HubService = request.app.state.service
    return service


def _principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    checked: Principal | None = getattr(request.state, "principal", None)
    if checked is not None:  # RequestGuard authenticated it before reading the body
        return checked
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
Notify = Annotated[Changes, Depends(_changes)]
Admin = Annotated[Principal, Depends(_admin)]
Node = Annotated[Principal, Depends(_node)]
Anyone = Annotated[Principal, Depends(_principal)]
Number = Annotated[int, Path(ge=1, le=MAX_ROUND, description="round number")]


def _binary(media_type: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 200 that is not JSON."""
    schema = {"type": "string", "format": "binary"} if media_type != "text/plain" else {}
    return {200: {"content": {media_type: {"schema": schema or {"type": "string"}}}}}


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
    async def study(study: str, service: Svc, who: Anyone) -> StudyInfo:
        return service.access.study(who, study)

    @app.post("/v1/studies/{study}/rounds")
    async def open_round(
        study: str, body: RoundOpen, service: Svc, changes: Notify, _: Admin
    ) -> RoundInfo:
        info = service.open_round(study, body.deadline_s)
        changes.notify()
        return info

    @app.get("/v1/studies/{study}/rounds")
    async def rounds(study: str, service: Svc, who: Anyone) -> list[RoundInfo]:
        service.spec(study)  # 404 for a study that does not exist, not []
        return service.access.rounds(who, study)

    @app.get("/v1/studies/{study}/rounds/{number}")
    async def round_info(
        study: str,
        number: Number,
        service: Svc,
        changes: Notify,
        who: Anyone,
        wait: Annotated[float, Query(ge=0, le=60)] = 0,
        state: str | None = None,
        metrics: int | None = None,
    ) -> RoundInfo:
        """With `wait`, answer once the round's state differs from `state` or its number of
        metric reports from `metrics` (a long-poll for `train round --wait`)."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            info = service.access.round(who, study, number)
            left = deadline - asyncio.get_running_loop().time()
            unchanged = info.state == state and len(info.metrics) == (metrics or 0)
            if left <= 0 or not unchanged or state is None:
                return info
            await changes.wait(min(left, LONG_POLL_STEP_S))

    @app.post("/v1/studies/{study}/rounds/{number}/updates")
    async def upload(
        study: str, number: Number, request: Request, service: Svc, changes: Notify, node: Node
    ) -> UpdateReceipt:
        if request.headers.get("content-type") != MEDIA_TYPE:
            service.refuse_update(node.name, study, number, f"updates are sent as {MEDIA_TYPE}")
        body = await request.body()
        if len(body) > MAX_UPDATE_BYTES:
            service.refuse_update(
                node.name, study, number, f"update of {len(body)} bytes is too large"
            )
        receipt = service.receive_update(node.name, study, number, body)
        changes.notify()
        return receipt

    @app.post("/v1/studies/{study}/rounds/{number}/decline")
    async def decline(
        study: str, number: Number, body: Decline, service: Svc, changes: Notify, node: Node
    ) -> dict[str, bool]:
        service.decline(node.name, study, number, body.reason, body.exclude)
        changes.notify()
        return {"ok": True}

    @app.post("/v1/studies/{study}/stats")
    async def stats(study: str, body: FeatureStats, service: Svc, node: Node) -> dict[str, bool]:
        service.report_stats(node.name, study, body)
        return {"ok": True}

    @app.get("/v1/work")
    async def work(
        service: Svc,
        changes: Notify,
        node: Node,
        wait: Annotated[float, Query(ge=0, le=60)] = 0,
        skip: Annotated[list[str] | None, Query(max_length=64)] = None,
    ) -> WorkItem:
        deadline = asyncio.get_running_loop().time() + wait
        declined = frozenset(skip or ())  # studies the node has not approved (yet)
        while True:
            item = service.work_for(node.name, declined)
            left = deadline - asyncio.get_running_loop().time()
            if item.kind != "idle" or left <= 0:
                return item
            await changes.wait(min(left, LONG_POLL_STEP_S))

    @app.get("/v1/models")
    async def models(service: Svc, who: Anyone, study: str | None = None) -> list[ModelVersionInfo]:
        return service.access.models(who, study)

    @app.get("/v1/models/{version}")
    async def model(version: str, service: Svc, who: Anyone) -> ModelVersionInfo:
        return service.access.model(who, version)

    @app.get("/v1/models/{version}/weights", responses=_binary("application/octet-stream"))
    async def weights(version: str, service: Svc, who: Anyone) -> Response:
        return Response(service.access.weights(who, version), media_type="application/octet-stream")

    @app.post("/v1/models/{version}/metrics")
    async def metrics(
        version: str, body: EvalReport, service: Svc, changes: Notify, node: Node
    ) -> dict[str, bool]:
        if body.version != version:
            raise ConflictError("report names another version than the URL")
        service.report_metrics(node.name, body)
        changes.notify()
        return {"ok": True}

    @app.get("/metrics", responses=_binary("text/plain"))
    async def prometheus(service: Svc, _: Admin) -> PlainTextResponse:
        return PlainTextResponse(service.prometheus_text())


def _secure_routes(app: FastAPI) -> None:
    """SecAgg+ stages and the CKKS key ceremony (DESIGN §7); see aipipe.hub.secure."""

    @app.get("/v1/keyring")
    async def keyring(service: Svc, _: Anyone) -> Keyring:
        return service.secure.keyring()

    prefix = "/v1/studies/{study}/rounds/{number}"

    @app.get(prefix + "/secagg/config")
    async def secagg_config(
        study: str, number: Number, service: Svc, node: Node
    ) -> SecAggRoundConfig:
        return service.secure.secagg.config(service.spec(study), number, node.name)

    @app.post(prefix + "/secagg/{step}")
    async def secagg_post(
        study: str,
        number: Number,
        step: str,
        request: Request,
        service: Svc,
        changes: Notify,
        node: Node,
    ) -> dict[str, bool]:
        service.secure.secagg.post(
            service.spec(study), number, node.name, step, await _small_body(request)
        )
        changes.notify()
        return {"ok": True}

    @app.get(prefix + "/secagg/{step}", responses={204: {"description": "not ready yet"}})
    async def secagg_poll(
        study: str,
        number: Number,
        step: str,
        service: Svc,
        changes: Notify,
        node: Node,
        wait: Annotated[float, Query(ge=0, le=60)] = 0,
    ) -> Response:
        """The node's message for `step` once the stage before it closed; 204 until then."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            message = service.secure.secagg.poll(service.spec(study), number, node.name, step)
            left = deadline - asyncio.get_running_loop().time()
            if message is not None:
                return Response(message.model_dump_json(), media_type="application/json")
            if left <= 0:
                return Response(status_code=204)
            await changes.wait(min(left, LONG_POLL_STEP_S))

    @app.post("/v1/studies/{study}/ckks/keys")
    async def ckks_keys(
        study: str, request: Request, service: Svc, changes: Notify, node: Node
    ) -> dict[str, bool]:
        service.secure.ckks.post_keys(service.spec(study), node.name, await _small_body(request))
        changes.notify()
        return {"ok": True}

    @app.get("/v1/studies/{study}/ckks/keys")
    async def ckks_key_info(study: str, service: Svc, node: Node) -> CkksKeyInfo:
        return service.secure.ckks.key_info(study, node.name)

    @app.get(prefix + "/ckks/sum", responses=_binary(MEDIA_TYPE))
    async def ckks_sum(study: str, number: Number, service: Svc, node: Node) -> Response:
        return Response(service.secure.ckks.bundle(study, number, node.name), media_type=MEDIA_TYPE)

    @app.post(prefix + "/ckks/decrypted")
    async def ckks_decrypted(
        study: str, number: Number, request: Request, service: Svc, changes: Notify, node: Node
    ) -> dict[str, bool]:
        body = await request.body()
        if len(body) > MAX_UPDATE_BYTES:
            raise ConflictError(f"decrypted sum of {len(body)} bytes is too large")
        service.secure.ckks.decrypted(service.spec(study), number, node.name, body)
        changes.notify()
        return {"ok": True}


async def _small_body(request: Request) -> bytes:
    """A JSON body of key material: keys, shares, sealed contexts (well under 64 MiB)."""
    body = await request.body()
    if len(body) > MAX_KEYS_BYTES:
        raise ConflictError(f"request body of {len(body)} bytes is too large for key material")
    return body
