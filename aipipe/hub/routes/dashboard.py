"""The dashboard: its data for the admin, scientists and auditors (`GET /v1/dashboard`), and the
page that draws it (`GET /dashboard`, public because it holds no data: it asks for a hub token,
keeps it in the tab's sessionStorage and fetches the data with it)."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from aipipe.hub.dashboard import audit_status, build
from aipipe.hub.routes.deps import Overseer, Svc
from aipipe.wire.dashboard import Dashboard

router = APIRouter()

NO_STORE = "no-store"


@router.get("/v1/dashboard")
async def dashboard(service: Svc, _: Overseer, response: Response) -> Dashboard:
    """Nodes, studies and their rounds, ε per site, model versions, the audit chain's status."""
    status = await run_in_threadpool(  # the whole chain is read: not on the event loop
        audit_status, service.audit.path, service.identity.public_bytes
    )
    response.headers["Cache-Control"] = NO_STORE
    return build(service.paths.config.name, service.store, service.spec, status)


HTML: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {"schema": {"type": "string"}}}}
}


@router.get("/dashboard", responses=HTML)
async def page() -> HTMLResponse:
    """The dashboard page (no data in it: it fetches /v1/dashboard with the token typed in)."""
    html, policy = _page()
    return HTMLResponse(html, headers=page_headers(policy))


def page_headers(policy: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": NO_STORE,
    }


@cache
def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: nothing from anywhere but this hub, and only
    the page's own inline script and style (by their sha256), no other inline code."""
    html = (resources.files("aipipe.hub") / "dashboard.html").read_text(encoding="utf-8")
    scripts = " ".join(_hashes(html, "script"))
    styles = " ".join(_hashes(html, "style"))
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


def _hashes(html: str, tag: str) -> list[str]:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = (hashlib.sha256(body.encode()).digest() for body in bodies)
    return [f"'sha256-{base64.b64encode(d).decode()}'" for d in digests]
