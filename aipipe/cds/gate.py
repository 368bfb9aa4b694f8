"""What every route of the CDS router passes through: authentication, the body cap, the audit.

Every route needs a CDS Client JWT (discovery too: it names the studies and model versions). A
router without a `JwtPolicy` answers 401 to everyone unless built with `allow_unauthenticated=True`,
which its hosts allow only on a loopback address (`aipipe.cds.limits.require_loopback`). The one
exception is a model card link the router signed (`aipipe.cds.links`, with `link_key`): it opens
its version's card without a JWT until it expires; a link with a bad or expired signature is
refused (401) whatever the JWT rule.

Every call is audited (`cds.request`, `cds.discovery`, `cds.feedback`, `auth.failure`) as a
`Record` the route fills in; a route that refuses raises `Reject` (status, message), answered as
an OperationOutcome. One call writes a bounded event: every audited string and list is cut
(`aipipe.cds.limits`), and a body is read only up to `MAX_BODY_BYTES`. The routes themselves
are in `aipipe.cds.service`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from aipipe.cds.auth import CdsClient, JwtPolicy
from aipipe.cds.limits import bounded, clip
from aipipe.cds.links import CardLinkSigner
from aipipe.cds.model_card import card_url
from aipipe.cds.provider import AuditSink, ServiceEntry
from aipipe.errors import AipipeError, AuthError

_M = TypeVar("_M", bound=BaseModel)

MAX_BODY_BYTES = 16 * 1024 * 1024
_NO_CLIENTS = (
    "this CDS service has no CDS clients configured, so it answers no one: register each EHR's "
    "issuer and JWK Set (hub.yaml cds_clients, `node serve-cds --cds-clients FILE`), or, on a "
    "loopback address only, opt out (hub.yaml cds_allow_unauthenticated, `node serve-cds "
    "--allow-unauthenticated`)"
)


class Reject(Exception):
    """A call refused: answered with `status` and an OperationOutcome that says `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Record:
    """What one call leaves in the audit log."""

    action: str
    resource: str
    actor: str = "cds-client:anonymous"
    outcome: str = "success"
    details: dict[str, Any] = field(default_factory=dict)


def operation_outcome(status: int, message: str) -> JSONResponse:
    code = {401: "login", 404: "not-found", 412: "processing", 413: "too-costly"}.get(
        status, "invalid"
    )
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}],
    }
    return JSONResponse(body, status_code=status)


class CdsGate:
    """The router's authentication (a CDS client JWT, or a model card link it signed) and the
    audit of each call, with the OperationOutcome a refused call answers."""

    def __init__(
        self,
        audit: AuditSink | None,
        jwt: JwtPolicy | None,
        allow_unauthenticated: bool,
        clock: Callable[[], datetime],
        base_url: str | None = None,
        links: CardLinkSigner | None = None,
    ) -> None:
        self._audit = audit
        self._jwt = jwt
        self._open = allow_unauthenticated
        self._clock = clock
        self._base_url = base_url
        self._links = links

    def authenticate(self, request: Request, endpoint: str, record: Record) -> CdsClient | None:
        if self._jwt is None:
            if self._open:
                return None
            record.action = "auth.failure"
            raise Reject(401, _NO_CLIENTS)
        audience = self._jwt.audience(str(request.url), endpoint)
        try:
            client = self._jwt.verify(request.headers.get("authorization"), audience)
        except AuthError as exc:
            record.action = "auth.failure"
            raise Reject(401, str(exc)) from None
        record.actor = client.actor
        if client.tenant is not None:
            record.details["tenant"] = client.tenant
        return client

    def authorize_card(self, request: Request, service_id: str, record: Record) -> None:
        """A JWT as for discovery; without one, a link carrying `sig` or `expires` must bear
        this router's valid, unexpired signature."""
        params = request.query_params
        signed = "sig" in params or "expires" in params
        if not signed or "authorization" in request.headers:
            self.authenticate(request, f"/cds-services/{service_id}/model-card", record)
            return
        try:
            if self._links is None:
                raise AuthError(
                    "this CDS service signs no model card links; present a CDS client JWT"
                )
            expires = self._links.verify(
                service_id, params.get("version"), params.get("expires"), params.get("sig"),
                self._clock(),
            )  # fmt: skip
        except AuthError as exc:
            record.action = "auth.failure"
            raise Reject(401, str(exc)) from None
        record.actor = "cds-link:model-card"
        record.details["link_expires"] = expires

    def card_url(self, request: Request, entry: ServiceEntry, version: str) -> str:
        """The link a card carries: the entry's own page, else this router's model card,
        signed when the router has a link key."""
        if entry.model_url:
            return entry.model_url
        url = card_url(self._base_url or str(request.base_url), entry.id, version)
        if self._links is None:
            return url
        return f"{url}&{urlencode(self._links.query(entry.id, version, self._clock()))}"

    def rejected(self, record: Record, exc: Reject) -> Response:
        record.outcome = "refused" if exc.status == 401 else "failure"
        record.details.update(status=exc.status, reason=exc.message)
        return operation_outcome(exc.status, clip(exc.message, 600))

    async def finish(self, *records: Record, response: Response) -> Response:
        """Audit, then answer. The append runs in a worker thread: an audit commit waits on
        fsync (~1 ms), and the event loop serves other calls meanwhile."""
        if self._audit is None:
            return response
        try:
            await anyio.to_thread.run_sync(self._append_all, records)
        except AipipeError:
            return operation_outcome(
                503, "the audit log cannot be written; the call was not served"
            )
        return response

    def _append_all(self, records: tuple[Record, ...]) -> None:
        assert self._audit is not None
        for record in records:
            self._audit.append(
                record.action,
                actor=clip(record.actor),
                resource=clip(record.resource),
                outcome=record.outcome,
                details=bounded(record.details),
            )


async def read_body(request: Request) -> bytes:
    """The body, read chunk by chunk and given up on as soon as it passes `MAX_BODY_BYTES`."""
    too_big = Reject(413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise Reject(400, "the request body is not valid JSON") from None
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
        raise Reject(400, f"not a valid {model.__name__}: " + "; ".join(parts)) from None
