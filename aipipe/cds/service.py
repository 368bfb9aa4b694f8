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

The routes authenticate and audit through `aipipe.cds.gate` (a CDS Client JWT on every route,
or a model card link the router signed). Every call is audited with the patient as an HMAC
pseudonym under the router's key, never the raw id; a service id that names no service is kept
as a short hash, and a feedback call carries at most `models.MAX_FEEDBACK` items. A fhirServer
off the operator's allow-list is never contacted: the call is answered from its prefetch (412 if
that lacks required data) and the refusal is audited with the server's origin only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from aipipe.cds.auth import JwtPolicy
from aipipe.cds.cards import build_cards, unscored_card
from aipipe.cds.fhir_access import EARLY_STOP, FhirAccess
from aipipe.cds.gate import CdsGate, Record, Reject, parse_body, read_body
from aipipe.cds.limits import clip, service_label
from aipipe.cds.links import DEFAULT_LIFETIME_S, CardLinkSigner
from aipipe.cds.model_card import model_card, render_html
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
from aipipe.fhir.base_url import origin_of

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class _CdsHandler:
    def __init__(
        self,
        provider: CdsProvider,
        gate: CdsGate,
        pseudonym_key: bytes,
        fhir: FhirAccess,
        clock: Callable[[], datetime],
    ) -> None:
        self._provider = provider
        self._gate = gate
        self._key = pseudonym_key
        self._fhir = fhir
        self._clock = clock

    # -- routes -----------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        record = Record("cds.discovery", "cds-services")
        try:
            self._gate.authenticate(request, "/cds-services", record)
        except Reject as exc:
            return await self._gate.finish(record, response=self._gate.rejected(record, exc))
        services = [entry.descriptor() for entry in self._provider.services()]
        record.details["services"] = len(services)
        return await self._gate.finish(
            record, response=JSONResponse(Discovery(services=services).dump())
        )

    async def model_card(self, service_id: str, request: Request) -> Response:
        """The model card of a version (`?version=`, default the current one): the same
        access as discovery, or a link this router signed."""
        service_id = service_label(service_id)
        record = Record("cds.model_card", f"cds-service:{service_id}")
        try:
            self._gate.authorize_card(request, service_id, record)
            entry = self._entries(service_id)[0]
            version = request.query_params.get("version")
            card = model_card(entry, version)
            if card is None:
                shown = clip(version or "", 80)
                raise Reject(
                    404, f"CDS service '{service_id}' knows no model version '{shown}'; its "
                    "current card is at this path without ?version",
                )  # fmt: skip
        except Reject as exc:
            return await self._gate.finish(record, response=self._gate.rejected(record, exc))
        record.details["model_version"] = card.model_version
        if "text/html" in request.headers.get("accept", ""):
            return await self._gate.finish(record, response=HTMLResponse(render_html(card)))
        return await self._gate.finish(record, response=JSONResponse(card.model_dump()))

    async def call(self, service_id: str, request: Request) -> Response:
        service_id = service_label(service_id)
        record = Record("cds.request", f"cds-service:{service_id}", details={"service": service_id})
        try:
            response = await self._call(service_id, request, record)
        except Reject as exc:
            response = self._gate.rejected(record, exc)
        return await self._gate.finish(record, response=response)

    async def feedback(self, service_id: str, request: Request) -> Response:
        service_id = service_label(service_id)
        record = Record(
            "cds.feedback", f"cds-service:{service_id}", details={"service": service_id}
        )
        try:
            items = await self._feedback(service_id, request, record)
        except Reject as exc:
            return await self._gate.finish(record, response=self._gate.rejected(record, exc))
        records = [Record("cds.feedback", record.resource, record.actor, details=i) for i in items]
        return await self._gate.finish(*records, response=Response(status_code=200))

    # -- work -------------------------------------------------------------------------------

    async def _call(self, service_id: str, request: Request, record: Record) -> Response:
        self._gate.authenticate(request, f"/cds-services/{service_id}", record)
        entries = self._entries(service_id)
        body = parse_body(CdsRequest, await read_body(request))
        record.details.update(hook=body.hook, hookInstance=body.hookInstance)
        entry = _entry_for_hook(entries, body.hook, service_id)
        patient_id = body.patient_id()
        if patient_id is None or not _FHIR_ID.match(patient_id):
            raise Reject(400, "context.patientId is missing or not a FHIR id")
        record.resource = f"patient:{self._pseudonym(patient_id)}"
        scorer = self._provider.scorer(entry.id)
        if scorer is None:
            raise Reject(503, f"no model is loaded for CDS service '{entry.id}'; try again later")
        values, notes, partial = await self._gather(entry, body, record)
        data = collect(values, patient_id, entry.study)
        url = self._gate.card_url(request, entry, scorer.model_version)
        cards = self._cards(entry, scorer, data, notes, record, partial, url)
        record.details["cards"] = [{"uuid": c.uuid, "indicator": c.indicator} for c in cards]
        return JSONResponse(CdsResponse(cards=cards).dump())

    def _cards(
        self,
        entry: ServiceEntry,
        scorer: PatientScorer,
        data: PatientData,
        notes: list[str],
        record: Record,
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
            raise Reject(412, f"{unread}; and the model lacks {names}")
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
        self, entry: ServiceEntry, body: CdsRequest, record: Record
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
                raise Reject(412, f"prefetch lacks {', '.join(required)} and {why}")
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
            raise Reject(412, "; ".join(fetched.errors[key] for key in failed))
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
        self, service_id: str, request: Request, record: Record
    ) -> list[dict[str, Any]]:
        self._gate.authenticate(request, f"/cds-services/{service_id}/feedback", record)
        self._entries(service_id)
        body = parse_body(FeedbackRequest, await read_body(request))
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

    def _refused_server(self, server: str | None, record: Record) -> str | None:
        """Why the request's fhirServer will not be contacted (audited by origin), or None."""
        refused = None if server is None else self._fhir.refusal(server)
        if server is not None and refused is not None:
            record.details["fhirServer_refused"] = origin_of(server)
        return refused

    def _entries(self, service_id: str) -> list[ServiceEntry]:
        entries = [entry for entry in self._provider.services() if entry.id == service_id]
        if not entries:
            raise Reject(404, f"no CDS service '{service_id}'; GET /cds-services lists them")
        return entries

    def _pseudonym(self, patient_id: str) -> str:
        return hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()[:20]


def _entry_for_hook(entries: list[ServiceEntry], hook: str, service_id: str) -> ServiceEntry:
    for entry in entries:
        if entry.hook == hook:
            return entry
    answers = ", ".join(sorted({entry.hook for entry in entries}))
    raise Reject(400, f"CDS service '{service_id}' answers the {answers} hook, not '{hook}'")


def _render(template: str, context: Mapping[str, Any]) -> str:
    try:
        return render_template(template, context)
    except ValueError as exc:
        raise Reject(400, str(exc)) from None


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
    clock = clock or wall_clock
    gate = CdsGate(audit, jwt, allow_unauthenticated, clock, base_url, links)
    handler = _CdsHandler(provider, gate, pseudonym_key, fhir or FhirAccess(), clock)
    router = APIRouter(tags=["cds-hooks"])
    router.add_api_route("/cds-services", handler.discovery, methods=["GET"])
    router.add_api_route("/cds-services/{service_id}", handler.call, methods=["POST"])
    router.add_api_route("/cds-services/{service_id}/feedback", handler.feedback, methods=["POST"])
    router.add_api_route(
        "/cds-services/{service_id}/model-card", handler.model_card, methods=["GET"]
    )
    return router
