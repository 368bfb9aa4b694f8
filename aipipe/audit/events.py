"""Audit event types and the pure hashing rules of the chain.

An event's hash is ``sha256`` over the canonical JSON of its content (every field but the hash
itself, ``details`` as a JSON object), so anyone holding an export can recompute it with nothing
but a JSON library. Canonical JSON here is Python's ``json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` in UTF-8. It matches RFC 8785 (JCS)
for strings, integers and the usual floats, but not for every float spelling (``1e16``), so
callers put counts, ids and short strings in ``details``, which is also what keeps PHI out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of event 1: there is nothing before it."""

EVENT_FIELDS = (
    "seq",
    "time",
    "actor",
    "action",
    "resource",
    "outcome",
    "details",
    "prev_hash",
    "hash",
)
"""Column order of the ``events`` table and of the CSV export."""

CHECKPOINT_FIELDS = ("seq", "hash", "time", "public_key", "signature")
"""Column order of the ``checkpoints`` table."""

_ACTION_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class Action(StrEnum):
    """Event names of DESIGN §9. Callers may pass any dotted lower-case string as well."""

    NODE_INIT = "node.init"
    ENROLMENT = "enrolment"
    STUDY_APPROVE = "study.approve"
    INGEST = "ingest"
    FEATURES_EXTRACT = "features.extract"
    TRAIN = "train"
    UPDATE_ACCEPTED = "update.accepted"
    UPDATE_REFUSED = "update.refused"
    AGGREGATE = "aggregate"
    MODEL_VERSION = "model.version"
    ROUND_OPEN = "round.open"
    ROUND_CLOSE = "round.close"
    WRITEBACK = "writeback"
    CDS_REQUEST = "cds.request"
    AUTH_FAILURE = "auth.failure"
    ADMIN = "admin"
    AUDIT_EXPORT = "audit.export"
    AUDIT_POLICY = "audit.policy"
    """The log's promise: a signed checkpoint every ``checkpoint_every`` events from here on."""


class Outcome(StrEnum):
    """How an audited operation ended: ``refused`` is a deliberate no (budget, policy, auth)."""

    SUCCESS = "success"
    FAILURE = "failure"
    REFUSED = "refused"


def canonical_json(value: Any) -> str:
    """The one JSON spelling of `value` that hashes are computed over."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def content_hash(content: Mapping[str, Any]) -> str:
    """sha256 hex of an event's content (all fields but ``hash``)."""
    body = {key: content.get(key) for key in EVENT_FIELDS if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def checkpoint_message(seq: int, event_hash: str) -> bytes:
    """The bytes a checkpoint signs: the sequence number and the hash of the head event."""
    return f"aipipe-audit-checkpoint:{seq}:{event_hash}".encode()


def check_action(action: str) -> str:
    """Return `action` as a plain string, or raise `ValueError` for a malformed name."""
    name = str(action)
    if not _ACTION_NAME.match(name):
        raise ValueError(
            f"audit action {name!r} is not a dotted lower-case name such as 'update.accepted'"
        )
    return name


def check_outcome(outcome: str) -> str:
    try:
        return Outcome(outcome).value
    except ValueError:
        allowed = ", ".join(o.value for o in Outcome)
        raise ValueError(f"audit outcome {outcome!r} is not one of {allowed}") from None


def normalise_details(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """Round-trip `details` through canonical JSON, so the event holds what verify will read back.

    Raises `TypeError` for values JSON cannot hold and `ValueError` for NaN or infinity.
    """
    parsed: dict[str, Any] = json.loads(canonical_json(dict(details or {})))
    return parsed


def parse_details(text: Any) -> Any:
    """Stored details as JSON, or the raw value where someone stored something that is not JSON."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def record_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row as hashed content: ``details`` parsed only if stored as canonical JSON.

    Text that is not the canonical spelling stays text, so its hash fails as an edit should.
    """
    text = row.get("details")
    parsed = parse_details(text)
    try:
        canonical = canonical_json(parsed) == text
    except (TypeError, ValueError):
        canonical = False
    return {**row, "details": parsed if canonical else text}


@dataclass(frozen=True)
class AuditEvent:
    """One link of the chain, as stored.

    ``details`` holds counts, sizes, ε spent, norms and pseudonymous ids, never PHI: no names,
    dates of birth, record numbers or free text from a patient record.
    """

    seq: int
    time: str
    actor: str
    action: str
    resource: str
    outcome: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    def content(self) -> dict[str, Any]:
        """The hashed fields (all but ``hash``)."""
        return {key: getattr(self, key) for key in EVENT_FIELDS if key != "hash"}

    def to_dict(self) -> dict[str, Any]:
        """All fields, ``details`` as a JSON object: one line of the JSONL export."""
        return {**self.content(), "hash": self.hash}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> AuditEvent:
        """Build from a stored or exported record without judging it (verify does that)."""
        fields: dict[str, Any] = {key: record.get(key) for key in EVENT_FIELDS}
        return cls(**fields)


@dataclass(frozen=True)
class Checkpoint:
    """A signature by the log owner's Ed25519 key over ``(seq, hash of event seq)``."""

    seq: int
    hash: str
    time: str
    public_key: str
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in CHECKPOINT_FIELDS}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Checkpoint:
        fields: dict[str, Any] = {key: record.get(key) for key in CHECKPOINT_FIELDS}
        return cls(**fields)
