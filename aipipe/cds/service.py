"""The CDS Hooks 2.0 service as a FastAPI router: discovery, service calls, feedback.

    GET  /cds-services                 discovery: one service per study × hook
    POST /cds-services/{id}            a hook call → {"cards": [...]}
    POST /cds-services/{id}/feedback   what the user did with a card → 200
    GET  /cds-services/{id}/model-card the model card every card links to (aipipe.cds.model_card)

Errors answer with a status and an OperationOutcome whose `diagnostics` says what was wrong:
400 for a body that is not a valid request (bad JSON, no `context.patientId`, a hook the service
does not answer), 401 for a missing or refused JWT, 404 for an unknown service, 413 for an
oversized body, and 412 when the data to score cannot be had: "If the CDS Service is unable to
obtain required data because it cannot access the FHIR server and the request did not contain
the necessary prefetch keys, the service SHALL respond with an HTTP 412 Precondition Failed
status code" (CDS Hooks 2.0). An unreachable fhirServer is that case too ("unable to retrieve the
necessary FHIR data … either through a prefetch request or directly calling the FHIR server").
Prefetched data that is present but unusable (null, of the wrong type, for another patient, or
missing values the model needs) is not a protocol error: it gets an `info` card saying what is
missing.

What the service reads itself is paged to the end within `FhirAccess.budget_s` for the whole
request (or until, newest first, every "latest" feature has its value). A search cut short
still scores when the model's inputs are all there (the card notes the unread pages); when some
input is missing it may be in the unread pages, so the answer is 412.

Every route needs a CDS Client JWT (discovery too: it names the studies and model versions). A
router without a `JwtPolicy` answers 401 to everyone unless built with `allow_unauthenticated=True`,
which its hosts allow only on a loopback address (`aipipe.cds.limits.require_loopback`). The one
exception is a model card link the router signed (`aipipe.cds.links`, with `link_key`): it opens
its version's card without a JWT until it expires; a link with a bad or expired signature is
refused (401) whatever the JWT rule.

Every call is audited (`cds.request`, `cds.discovery`, `cds.feedback`, `auth.failure`) with the
patient as an HMAC pseudonym under the router's key, never the raw id. One call writes a bounded
event: a service id that names no service is kept as a short hash, every audited string and list
is cut (`aipipe.cds.limits`), a feedback call carries at most `models.MAX_FEEDBACK` items, and a
body is read only up to `MAX_BODY_BYTES`. A fhirServer off the operator's allow-list is never
contacted: the call is answered from its prefetch (412 if that lacks required data) and the
refusal is audited with the server's origin only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

from aipipe.cds.auth import CdsClient, JwtPolicy
from aipipe.cds.cards import build_cards, unscored_card
from aipipe.cds.fhir_access import EARLY_STOP, FhirAccess
from aipipe.cds.limits import bounded, clip, service_label
from aipipe.cds.links import DEFAULT_LIFETIME_S, CardLinkSigner
from aipipe.cds.model_card import card_url, model_card, render_html
from aipipe.cds.models import Card, CdsRequest, CdsResponse, Discovery, FeedbackRequest
from aipipe.cds.prefetch import (
    OBSERVATIONS,
    REQUIRED,
    PatientData,
    collect,
    lookback_filter,
    newest_values_found,
    render_template,
    unsatisfied,
)
from aipipe.cds.provider import AuditSink, CdsProvider, ServiceEntry
from aipipe.cds.scoring import PatientScorer
from aipipe.clock import now as wall_clock
from aipipe.errors import AipipeError, AuthError
from aipipe.fhir.base_url import origin_of

_M = TypeVar("_M", bound=BaseModel)

MAX_BODY_BYTES = 16 * 1024 * 1024
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_NO_CLIENTS = (
    "this CDS service has no CDS clients configured, so it answers no one: register each EHR's "
    "issuer and JWK Set (hub.yaml cds_clients, `node serve-cds --cds-clients FILE`), or, on a "
    "loopback address only, opt out (hub.yaml cds_allow_unauthenticated, `node serve-cds "
    "--allow-unauthenticated`)"
)


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Record:
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


class _CdsHandler:
    def __init__(
        self,
        provider: CdsProvider,
        audit: AuditSink | None,
        jwt: JwtPolicy | None,
        pseudonym_key: bytes,
        fhir: FhirAccess,
        clock: Callable[[], datetime],
        allow_unauthenticated: bool,
        base_url: str | None = None,
        links: CardLinkSigner | None = None,
    ) -> None:
        self._base_url = base_url
        self._links = links
        self._provider = provider
        self._audit = audit
        self._jwt = jwt
        self._open = allow_unauthenticated
        self._key = pseudonym_key
        self._fhir = fhir
        self._clock = clock

    # -- routes -----------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        record = _Record("cds.discovery", "cds-services")
        try:
            self._authenticate(request, "/cds-services", record)
        except _Reject as exc:
            return await self._finish(record, response=self._rejected(record, exc))
        services = [entry.descriptor() for entry in self._provider.services()]
        record.details["services"] = len(services)
        return await self._finish(
            record, response=JSONResponse(Discovery(services=services).dump())
        )

    async def model_card(self, service_id: str, request: Request) -> Response:
        """The model card of a version (`?version=`, default the current one): the same
        access as discovery, or a link this router signed."""
        service_id = service_label(service_id)
        record = _Record("cds.model_card", f"cds-service:{service_id}")
        try:
            self._authorize_card(request, service_id, record)
            entry = self._entries(service_id)[0]
            version = request.query_params.get("version")
            card = model_card(entry, version)
            if card is None:
                shown = clip(version or "", 80)
                raise _Reject(
                    404, f"CDS service '{service_id}' knows no model version '{shown}'; its "
                    "current card is at this path without ?version",
                )  # fmt: skip
        except _Reject as exc:
            return await self._finish(record, response=self._rejected(record, exc))
        record.details["model_version"] = card.model_version
        if "text/html" in request.headers.get("accept", ""):
            return await self._finish(record, response=HTMLResponse(render_html(card)))
        return await self._finish(record, response=JSONResponse(card.model_dump()))

    def _authorize_card(self, request: Request, service_id: str, record: _Record) -> None:
        """A JWT as for discovery; without one, a link carrying `sig` or `expires` must bear
        this router's valid, unexpired signature."""
        params = request.query_params
        signed = "sig" in params or "expires" in params
        if not signed or "authorization" in request.headers:
            self._authenticate(request, f"/cds-services/{service_id}/model-card", record)
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
            raise _Reject(401, str(exc)) from None
        record.actor = "cds-link:model-card"
        record.details["link_expires"] = expires

    def _card_url(self, request: Request, entry: ServiceEntry, version: str) -> str:
        """The link a card carries: the entry's own page, else this router's model card,
        signed when the router has a link key."""
        if entry.model_url:
            return entry.model_url
        url = card_url(self._base_url or str(request.base_url), entry.id, version)
        if self._links is None:
            return url
        return f"{url}&{urlencode(self._links.query(entry.id, version, self._clock()))}"

    async def call(self, service_id: str, request: Request) -> Response:
        service_id = service_label(service_id)
        record = _Record(
            "cds.request", f"cds-service:{service_id}", details={"service": service_id}
        )
        try:
            response = await self._call(service_id, request, record)
        except _Reject as exc:
            response = self._rejected(record, exc)
        return await self._finish(record, response=response)

    async def feedback(self, service_id: str, request: Request) -> Response:
        service_id = service_label(service_id)
        record = _Record(
            "cds.feedback", f"cds-service:{service_id}", details={"service": service_id}
        )
        try:
            items = await self._feedback(service_id, request, record)
        except _Reject as exc:
            return await self._finish(record, response=self._rejected(record, exc))
        records = [_Record("cds.feedback", record.resource, record.actor, details=i) for i in items]
        return await self._finish(*records, response=Response(status_code=200))

    # -- work -------------------------------------------------------------------------------

    async def _call(self, service_id: str, request: Request, record: _Record) -> Response:
        self._authenticate(request, f"/cds-services/{service_id}", record)
        entries = self._entries(service_id)
        body = _parse(CdsRequest, await _read_body(request))
        record.details.update(hook=body.hook, hookInstance=body.hookInstance)
        entry = _entry_for_hook(entries, body.hook, service_id)
        patient_id = body.patient_id()
        if patient_id is None or not _FHIR_ID.match(patient_id):
            raise _Reject(400, "context.patientId is missing or not a FHIR id")
        record.resource = f"patient:{self._pseudonym(patient_id)}"
        scorer = self._provider.scorer(entry.id)
        if scorer is None:
            raise _Reject(503, f"no model is loaded for CDS service '{entry.id}'; try again later")
        values, notes, partial = await self._gather(entry, body, record)
        data = collect(values, patient_id, entry.study)
        url = self._card_url(request, entry, scorer.model_version)
        cards = self._cards(entry, scorer, data, notes, record, partial, url)
        record.details["cards"] = [{"uuid": c.uuid, "indicator": c.indicator} for c in cards]
        return JSONResponse(CdsResponse(cards=cards).dump())

    def _cards(
        self,
        entry: ServiceEntry,
        scorer: PatientScorer,
        data: PatientData,
        notes: list[str],
        record: _Record,
        partial: Mapping[str, str],
        url: str,
    ) -> list[Card]:
        source = replace(entry.source(), model_version=scorer.model_version, url=url)
        record.details.update(model_version=scorer.model_version, observations=data.observations)
        if data.blocking:
            record.details.update(scored=False, unusable=len(data.blocking))
            return [unscored_card(source, [], data.blocking)]
        now = self._clock()
        # Scored as of today: age on the day of care and every observation up to it.
        result = scorer.score(data.resources, patient_id=data.patient_id, as_of=now.date())
        record.details.update(scored=result.scored, missing=[m.name for m in result.missing])
        if partial and result.missing:  # what is missing may be on the pages not read
            names = ", ".join(m.name for m in result.missing)
            unread = "; ".join(
                f"the '{key}' search was cut short: {why}" for key, why in partial.items()
            )
            raise _Reject(412, f"{unread}; and the model lacks {names}")
        notes += [
            f"'{key}' was not read to its end: {why}"
            for key, why in partial.items()
            if why != EARLY_STOP
        ]
        if data.outcome_recorded:
            notes.append(f"the record already lists {source.label}")
        return build_cards(
            result, source=source, settings=entry.settings, now=now, notes=[*data.notes, *notes]
        )

    async def _gather(
        self, entry: ServiceEntry, body: CdsRequest, record: _Record
    ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
        """Prefetched values, topped up from the fhirServer; 412 if required data is unreachable.
        Also the required searches read only in part (key → why)."""
        values = dict(body.prefetch or {})
        todo = unsatisfied(entry.prefetch, values)
        record.details["data"] = "prefetch"
        if not todo:
            return values, [], {}
        required = [key for key in todo if key in REQUIRED]
        refused = self._refused_server(body.fhirServer, record)
        if body.fhirServer is None or refused is not None:
            why = refused or "no fhirServer was given to read them from"
            if required:
                raise _Reject(412, f"prefetch lacks {', '.join(required)} and {why}")
            return (
                values,
                [] if refused is None else [f"'{k}' could not be read: {why}" for k in todo],
                {},
            )
        as_of = self._clock().date()
        queries = {key: _render(entry.prefetch[key], body.context) for key in todo}
        if OBSERVATIONS in queries:
            queries[OBSERVATIONS] += lookback_filter(entry.study, as_of)
        newest = newest_values_found(entry.study, as_of)
        token = body.fhirAuthorization.access_token if body.fhirAuthorization else None
        partial = len(todo) < len(entry.prefetch)
        record.details["data"] = "prefetch+fhirServer" if partial else "fhirServer"
        enough = {OBSERVATIONS: newest} if newest is not None else None
        fetched = await self._fhir.fetch(body.fhirServer, token, queries, enough=enough)
        failed = [key for key in required if key in fetched.errors]
        if failed:
            raise _Reject(412, "; ".join(fetched.errors[key] for key in failed))
        values.update(fetched.values)
        notes = [f"'{key}' could not be read: {why}" for key, why in fetched.errors.items()]
        if fetched.partial:
            record.details["partial"] = sorted(fetched.partial)
        notes += [
            f"'{key}' was not read to its end: {why}"
            for key, why in fetched.partial.items()
            if key not in REQUIRED
        ]
        cut = {k: why for k, why in fetched.partial.items() if k in REQUIRED}
        return values, notes, cut

    async def _feedback(
        self, service_id: str, request: Request, record: _Record
    ) -> list[dict[str, Any]]:
        self._authenticate(request, f"/cds-services/{service_id}/feedback", record)
        self._entries(service_id)
        body = _parse(FeedbackRequest, await _read_body(request))
        items = []
        for item in body.feedback:
            details: dict[str, Any] = {
                "service": service_id,
                "card": item.card,
                "outcome": item.outcome,
                "outcomeTimestamp": item.outcomeTimestamp,
            }
            if item.acceptedSuggestions:
                details["acceptedSuggestions"] = [s.id for s in item.acceptedSuggestions]
            if item.overrideReason is not None:
                reason = item.overrideReason.reason
                if reason is not None:
                    details["overrideReason"] = {"system": reason.system, "code": reason.code}
                # Free text from a clinician may name the patient: its presence is kept, not it.
                details["userComment"] = item.overrideReason.userComment is not None
            items.append(details)
        return items

    # -- helpers ----------------------------------------------------------------------------

    def _refused_server(self, server: str | None, record: _Record) -> str | None:
        """Why the request's fhirServer will not be contacted (audited by origin), or None."""
        refused = None if server is None else self._fhir.refusal(server)
        if server is not None and refused is not None:
            record.details["fhirServer_refused"] = origin_of(server)
        return refused

    def _authenticate(self, request: Request, endpoint: str, record: _Record) -> CdsClient | None:
        if self._jwt is None:
            if self._open:
                return None
            record.action = "auth.failure"
            raise _Reject(401, _NO_CLIENTS)
        audience = self._jwt.audience(str(request.url), endpoint)
        try:
            client = self._jwt.verify(request.headers.get("authorization"), audience)
        except AuthError as exc:
            record.action = "auth.failure"
            raise _Reject(401, str(exc)) from None
        record.actor = client.actor
        if client.tenant is not None:
            record.details["tenant"] = client.tenant
        return client

    def _entries(self, service_id: str) -> list[ServiceEntry]:
        entries = [entry for entry in self._provider.services() if entry.id == service_id]
        if not entries:
            raise _Reject(404, f"no CDS service '{service_id}'; GET /cds-services lists them")
        return entries

    def _pseudonym(self, patient_id: str) -> str:
        return hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()[:20]

    def _rejected(self, record: _Record, exc: _Reject) -> Response:
        record.outcome = "refused" if exc.status == 401 else "failure"
        record.details.update(status=exc.status, reason=exc.message)
        return operation_outcome(exc.status, clip(exc.message, 600))

    async def _finish(self, *records: _Record, response: Response) -> Response:
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

    def _append_all(self, records: tuple[_Record, ...]) -> None:
        assert self._audit is not None
        for record in records:
            self._audit.append(
                record.action,
                actor=clip(record.actor),
                resource=clip(record.resource),
                outcome=record.outcome,
                details=bounded(record.details),
            )


def _entry_for_hook(entries: list[ServiceEntry], hook: str, service_id: str) -> ServiceEntry:
    for entry in entries:
        if entry.hook == hook:
            return entry
    answers = ", ".join(sorted({entry.hook for entry in entries}))
    raise _Reject(400, f"CDS service '{service_id}' answers the {answers} hook, not '{hook}'")


def _render(template: str, context: Mapping[str, Any]) -> str:
    try:
        return render_template(template, context)
    except ValueError as exc:
        raise _Reject(400, str(exc)) from None


async def _read_body(request: Request) -> bytes:
    """The body, read chunk by chunk and given up on as soon as it passes `MAX_BODY_BYTES`."""
    too_big = _Reject(413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MiB")
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


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise _Reject(400, "the request body is not valid JSON") from None
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
        raise _Reject(400, f"not a valid {model.__name__}: " + "; ".join(parts)) from None


def cds_router(
    provider: CdsProvider,
    *,
    audit: AuditSink | None,
    jwt: JwtPolicy | None,
    pseudonym_key: bytes,
    fhir: FhirAccess | None = None,
    clock: Callable[[], datetime] | None = None,
    allow_unauthenticated: bool = False,
    base_url: str | None = None,
    link_key: bytes | None = None,
    link_lifetime_s: float = DEFAULT_LIFETIME_S,
) -> APIRouter:
    """The CDS Hooks routes, to mount at the service's `{baseUrl}` (`app.include_router(...)`).

    `pseudonym_key` (≥ 16 bytes, secret) keys the HMAC that stands for patients in the audit log.
    `jwt=None` answers every call 401, unless `allow_unauthenticated` (for a service bound to
    loopback only: tests, a demo, behind an authenticating proxy). `fhir` says which fhirServers
    may be read (`FhirAccess()`: none). `base_url` is the service's public `{baseUrl}` for the
    model card links (default: the URL each request was made to). With `link_key` (≥ 16 secret
    bytes, `aipipe.cds.links.load_link_key`, not the pseudonym key) those links are signed and
    open without a JWT for `link_lifetime_s` seconds (default 24 h); without it they need a JWT.
    """
    if len(pseudonym_key) < 16:
        raise ValueError("pseudonym_key must be at least 16 secret bytes")
    if link_key is not None and hmac.compare_digest(link_key, pseudonym_key):
        raise ValueError("link_key must not be the pseudonym key: give each its own secret")
    links = None if link_key is None else CardLinkSigner(link_key, link_lifetime_s)
    handler = _CdsHandler(
        provider, audit, jwt, pseudonym_key, fhir or FhirAccess(), clock or wall_clock,
        allow_unauthenticated, base_url, links,
    )  # fmt: skip
    router = APIRouter(tags=["cds-hooks"])
    router.add_api_route("/cds-services", handler.discovery, methods=["GET"])
    router.add_api_route("/cds-services/{service_id}", handler.call, methods=["POST"])
    router.add_api_route("/cds-services/{service_id}/feedback", handler.feedback, methods=["POST"])
    router.add_api_route(
        "/cds-services/{service_id}/model-card", handler.model_card, methods=["GET"]
    )
    return router
