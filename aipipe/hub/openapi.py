"""The hub's OpenAPI description: every error it answers, and who may read the description.

Every error the hub's own routes answer is `ErrorBody` (`{"error": "NotFoundError", "detail":
"..."}`; `error` names the `AipipeError` class, absent from a 413 or a malformed request),
request validation errors included (one line naming the fields, never their values: an
enrolment secret must not echo back). The CDS Hooks routes answer FHIR OperationOutcomes instead.

`/openapi.json` is served to people's tokens (admin, scientist, auditor; not to nodes); with
`api_docs: true` in hub.yaml it and the Swagger UI at `/docs` are public, and the UI's script
and stylesheet come from the hub itself (the `swagger-ui-bundle-v2` package), so the page works
on a network without internet.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from aipipe.hub.home import HubConfig
from aipipe.hub.principal import Principal
from aipipe.hub.roles import Allow
from aipipe.wire.messages import ErrorBody

ASSETS = "/docs/assets"
Reader = Annotated[Principal, Depends(Allow("admin", "scientist", "auditor"))]


_ERRORS = {
    400: "The request is malformed (not JSON, or not what the route takes)",
    401: "No token, or an unknown, expired or revoked one",
    403: "The credential's role may not call this route, or may not read or post this (a node "
    "outside the study)",
    404: "No such study, round, model or node",
    409: "Refused in the current state (a closed round, a replayed or refused update)",
    413: "The body is over the route's size limit",
    422: "The request or the study fails validation",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _ERRORS.items()
}

_OUTCOME = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {"type": "array", "items": {"type": "object"}},
    },
}
CDS_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": f"FHIR OperationOutcome: {text}",
        "content": {"application/json": {"schema": _OUTCOME}},
    }
    for status, text in {
        400: "the hook request is malformed",
        401: "no or an invalid client JWT",
        404: "no such CDS service",
        412: "required data could not be read",
        503: "no model loaded yet, or the audit log cannot be written",
    }.items()
}


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, as one line: where and what, without the offending values."""
    assert isinstance(exc, RequestValidationError)
    parts = [
        f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg', 'invalid')}"
        for e in exc.errors()[:3]
    ]
    more = f" (and {len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return JSONResponse({"detail": "invalid request: " + "; ".join(parts) + more}, 422)


DOCS = APIRouter()  # /openapi.json behind the roles (part of the README's route × role table)


@DOCS.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _: Reader) -> JSONResponse:
    return JSONResponse(request.app.openapi())


def add_docs(app: FastAPI, config: HubConfig) -> None:
    """`/openapi.json` for people's tokens (public with `api_docs`), `/docs` with `api_docs`."""
    if not config.api_docs:
        app.include_router(DOCS)
        return

    @app.get("/openapi.json", include_in_schema=False)
    async def public_openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
