"""Export an audit log as JSONL, CSV or a FHIR R4 AuditEvent Bundle.

- ``jsonl``: one canonical JSON event per line, hashes included, each checkpoint as a
  ``{"checkpoint": {...}}`` line after the event it signs; `verify_jsonl` re-verifies it
  without the database.
- ``csv``: the ``events`` table's columns in table order, values as stored (``details`` as its
  JSON text). Values are not escaped against spreadsheet formulas, so that they stay the hashed
  values; open it as text or import it, do not double-click it into a spreadsheet.
- ``fhir``: a Bundle of type ``collection`` of AuditEvent resources (`aipipe.audit.fhir`).

Exports read one consistent snapshot, stream (memory does not grow with the log), and replace
`out` only once complete. The export does not judge the chain: a tampered log exports as stored,
and verifying the export fails where verifying the database does.
"""

from __future__ import annotations

import csv
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TextIO

from aipipe.audit.events import EVENT_FIELDS, AuditEvent, canonical_json, record_from_row
from aipipe.audit.fhir import bundle_entry
from aipipe.audit.storage import LogSnapshot, read_snapshot
from aipipe.audit.verify import verify_jsonl
from aipipe.clock import utc_now
from aipipe.errors import ConfigError

ExportFormat = Literal["jsonl", "csv", "fhir"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("jsonl", "csv", "fhir")
DEFAULT_OBSERVER = "aipipe"

__all__ = ["EXPORT_FORMATS", "ExportFormat", "export", "verify_jsonl"]


def _write_jsonl(snapshot: LogSnapshot, handle: TextIO, observer: str) -> int:
    pending = deque(snapshot.checkpoints)
    count = 0
    for row in snapshot.event_rows():
        handle.write(canonical_json(record_from_row(row)) + "\n")
        count += 1
        while pending and pending[0].seq <= row["seq"]:
            handle.write(canonical_json({"checkpoint": pending.popleft().to_dict()}) + "\n")
    for checkpoint in pending:  # beyond the last event: a truncated log, kept for verify to see
        handle.write(canonical_json({"checkpoint": checkpoint.to_dict()}) + "\n")
    return count


def _write_csv(snapshot: LogSnapshot, handle: TextIO, observer: str) -> int:
    writer = csv.writer(handle)
    writer.writerow(EVENT_FIELDS)
    count = 0
    for row in snapshot.event_rows():
        writer.writerow([row[key] for key in EVENT_FIELDS])
        count += 1
    return count


def _write_fhir(snapshot: LogSnapshot, handle: TextIO, observer: str) -> int:
    # Streamed by hand so that memory stays flat; FHIR JSON forbids an empty "entry": [].
    handle.write(f'{{"resourceType": "Bundle", "type": "collection", "timestamp": "{utc_now()}"')
    count = 0
    for row in snapshot.event_rows():
        event = AuditEvent.from_dict(record_from_row(row))
        handle.write(',\n"entry": [\n' if count == 0 else ",\n")
        handle.write(json.dumps(bundle_entry(event, observer=observer), ensure_ascii=False))
        count += 1
    handle.write("\n]}\n" if count else "}\n")
    return count


_WRITERS: dict[str, Callable[[LogSnapshot, TextIO, str], int]] = {
    "jsonl": _write_jsonl,
    "csv": _write_csv,
    "fhir": _write_fhir,
}


@contextmanager
def _replace_when_done(out: Path) -> Iterator[TextIO]:
    """Write to a temporary file beside `out` and move it into place only on success."""
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        handle = partial.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise ConfigError(f"cannot write audit export {out}: {exc.strerror}") from exc
    try:
        with handle:
            yield handle
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def export(path: Path, fmt: ExportFormat, out: Path, *, observer: str | None = None) -> int:
    """Write the log at `path` to `out` in `fmt`; return the number of events written.

    `observer` names the log's owner in the FHIR Bundle (default: the owner recorded in the log).
    Recording the export in the log is the caller's part (``Action.AUDIT_EXPORT``).
    """
    writer = _WRITERS.get(fmt)
    if writer is None:
        raise ConfigError(f"unknown audit export format {fmt!r}; use jsonl, csv or fhir")
    with read_snapshot(path) as snapshot, _replace_when_done(out) as handle:
        return writer(snapshot, handle, observer or snapshot.owner or DEFAULT_OBSERVER)
