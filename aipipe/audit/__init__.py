"""Tamper-evident audit: a hash-chained, append-only event log with signed checkpoints.

Every process (node, hub) appends typed events to its own ``audit.sqlite``; each event's hash
covers its content and the previous event's hash, and the owner's Ed25519 key signs the head
every so many events (the cadence is a signed ``audit.policy`` event in the log) and at close.
`verify` proves a log (or `verify_jsonl` an export) unbroken, checkpointed as promised and, given
an `Anchor` (a signed head kept elsewhere), not truncated or replaced; `export` writes JSONL, CSV
or a FHIR R4 AuditEvent Bundle.

Details carry counts, ε, norms and pseudonymous ids only, never PHI::

    with AuditLog.open(home / "audit.sqlite", identity, owner="st-olav") as log:
        log.append(Action.TRAIN, actor="node:st-olav", resource="study:chd",
                   details={"round": 7, "epsilon_spent": 0.21, "update_norm": 0.93})
"""

from aipipe.audit.anchor import HEADER, Anchor, HeadRecorder
from aipipe.audit.events import GENESIS_HASH, Action, AuditEvent, Checkpoint, Outcome
from aipipe.audit.export import EXPORT_FORMATS, ExportFormat, export
from aipipe.audit.log import AuditLog
from aipipe.audit.verify import VerifyReport, verify, verify_jsonl

__all__ = [
    "EXPORT_FORMATS",
    "GENESIS_HASH",
    "HEADER",
    "Action",
    "Anchor",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "ExportFormat",
    "HeadRecorder",
    "Outcome",
    "VerifyReport",
    "export",
    "verify",
    "verify_jsonl",
]
