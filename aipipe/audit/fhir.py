"""Audit events as FHIR R4 ``AuditEvent`` resources, for an ethics board's or a SIEM's tooling.

Every element follows R4: ``agent.requestor`` and ``source.observer`` (a Reference) are present,
``entity.detail`` carries ``valueString`` (R4 allows only string or base64Binary there), and no
string or array is empty. The chain fields travel as entity details (``seq``, ``details``,
``hash``, ``prev_hash``) so that the hashes stay checkable from the Bundle.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from aipipe.audit.events import Action, AuditEvent, Outcome, canonical_json

AUDIT_ACTION_SYSTEM = "https://aipipe.dev/fhir/CodeSystem/audit-action"
EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DICOM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"

_REST = {"system": EVENT_TYPE_SYSTEM, "code": "rest", "display": "RESTful Operation"}
_APPLICATION_ACTIVITY = {
    "system": DICOM_SYSTEM,
    "code": "110100",
    "display": "Application Activity",
}

# AuditEvent.action (C create, R read, U update, D delete, E execute) per action; unknown → E.
FHIR_ACTION: Mapping[str, str] = {
    Action.NODE_INIT: "C",
    Action.ENROLMENT: "C",
    Action.STUDY_APPROVE: "U",
    Action.INGEST: "C",
    Action.FEATURES_EXTRACT: "E",
    Action.TRAIN: "E",
    Action.UPDATE_ACCEPTED: "C",
    Action.UPDATE_REFUSED: "E",
    Action.AGGREGATE: "E",
    Action.MODEL_VERSION: "C",
    Action.ROUND_OPEN: "C",
    Action.ROUND_CLOSE: "U",
    Action.WRITEBACK: "C",
    Action.CDS_REQUEST: "E",
    Action.AUTH_FAILURE: "E",
    Action.ADMIN: "E",
    Action.AUDIT_EXPORT: "R",
}

# AuditEvent.outcome: 0 success, 4 minor failure (a deliberate refusal), 8 serious failure.
FHIR_OUTCOME: Mapping[str, str] = {
    Outcome.SUCCESS: "0",
    Outcome.REFUSED: "4",
    Outcome.FAILURE: "8",
}


def _text(value: Any) -> str | None:
    """A FHIR string, or None where FHIR would refuse an empty one."""
    text = value if isinstance(value, str) else canonical_json(value)
    return text if text.strip() else None


def _display(value: Any) -> dict[str, str] | None:
    text = _text(value)
    return None if text is None else {"display": text}


def _details(event: AuditEvent) -> list[dict[str, str]]:
    values = {
        "seq": str(event.seq),
        "details": event.details,
        "hash": event.hash,
        "prev_hash": event.prev_hash,
    }
    details = []
    for kind, value in values.items():
        text = _text(value)
        if text is not None:
            details.append({"type": kind, "valueString": text})
    return details


def audit_event_resource(event: AuditEvent, *, observer: str) -> dict[str, Any]:
    """One FHIR R4 AuditEvent (JSON) for `event`, observed by the log's owner."""
    action = str(event.action)
    entity: dict[str, Any] = {"detail": _details(event)}
    what = _display(event.resource)
    if what is not None:
        entity["what"] = what
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _REST if action == Action.CDS_REQUEST else _APPLICATION_ACTIVITY,
        "subtype": [{"system": AUDIT_ACTION_SYSTEM, "code": action}],
        "action": FHIR_ACTION.get(action, "E"),
        "recorded": event.time,
        "outcome": FHIR_OUTCOME.get(str(event.outcome), "8"),
        "outcomeDesc": f"{action}: {event.outcome}",
        "agent": [{"who": _display(event.actor) or {"display": "unknown"}, "requestor": True}],
        "source": {
            "observer": {"display": observer},
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
        "entity": [entity],
    }
    return resource


def bundle_entry(event: AuditEvent, *, observer: str) -> dict[str, Any]:
    """A Bundle entry whose ``urn:uuid`` is derived from the event hash, so re-exports agree."""
    digest = str(event.hash)
    try:
        key = uuid.UUID(hex=digest[:32], version=5)
    except ValueError:  # a tampered hash: still export it, verify will say what is wrong
        key = uuid.uuid5(uuid.NAMESPACE_URL, f"aipipe-audit:{digest}")
    return {
        "fullUrl": f"urn:uuid:{key}",
        "resource": audit_event_resource(event, observer=observer),
    }
