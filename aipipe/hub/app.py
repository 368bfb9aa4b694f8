"""The hub's HTTP API (FastAPI), versioned under /v1: `create_app` opens the home, starts the
ticker and assembles the routers of `aipipe.hub.routes` (each route a thin skin over
`HubService`) and the CDS Hooks service; an `AipipeError` answers its class's `http_status` with
`error_body` (the table in `aipipe.errors`).

All routes are `async def` so that the SQLite connection is used from the event loop's
thread only; the work behind each request is small (a model is kilobytes to megabytes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from aipipe import __version__
from aipipe.audit.log import AuditLog
from aipipe.cds import JwtPolicy, cds_router
from aipipe.cds.links import load_link_key
from aipipe.errors import AipipeError, ThrottledError, error_body
from aipipe.hub import mtls
from aipipe.hub.audit_head import AuditHeadMiddleware
from aipipe.hub.cds import HubCdsProvider, hub_fhir_access
from aipipe.hub.home import HubPaths
from aipipe.hub.limits import RequestGuard, Scope
from aipipe.hub.metrics import CdsLatency, HubMetrics
from aipipe.hub.openapi import CDS_RESPONSES, ERROR_RESPONSES, add_docs, validation_error
from aipipe.hub.principal import Principal
from aipipe.hub.routes import ROUTERS
from aipipe.hub.routes.deps import Changes
from aipipe.hub.service import HubService
from aipipe.secure.identity import Identity

TICK_S = 0.5


def create_app(paths: HubPaths) -> FastAPI:
    """The ASGI app for one hub home."""
    metrics = HubMetrics()  # this app's own registry: never shared with another app

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        identity = Identity.load(paths.identity_key, at_rest=paths.at_rest)
        store = paths.open_store()
        audit = AuditLog.open(paths.audit_log, identity, owner=f"hub/{paths.config.name}")
        service = HubService(paths, store, audit, identity, metrics)
        metrics.watch(store)
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
            metrics.unwatch()
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
    app.add_middleware(CdsLatency, metrics=metrics)

    @app.exception_handler(AipipeError)
    async def _aipipe_error(request: Request, exc: AipipeError) -> JSONResponse:
        headers = None
        if isinstance(exc, ThrottledError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(RequestGuard, authenticate=_guard_authenticate)
    add_docs(app, paths.config)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _guard_authenticate(scope: Scope, token: str | None) -> Principal:
    """The token check `RequestGuard` runs before a body is read (and, with mutual TLS, the
    node certificate binding of `aipipe.hub.mtls`)."""
    return mtls.authenticate(scope, token)


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
                      link_key=load_link_key(paths.cds_link_key, at_rest=paths.at_rest),
                      link_lifetime_s=paths.config.cds_link_lifetime_s)  # fmt: skip


async def _tick_forever(service: HubService, changes: Changes) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        if service.tick():
            changes.notify()
