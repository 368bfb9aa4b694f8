"""Ingest: FHIR sources → mapping → `NodeStore`, in batches, with a per-type report.

Bad input never stops an ingest: an unreadable line or entry, a resource without identity or
subject, a string where a number belongs, a truncated file, each is counted under its type (or
`unknown`) with its reason, and the rest of the input is stored. Reports carry counts and
reasons, never resource contents.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aipipe.clock import utc_now
from aipipe.fhir.files import Progress, SourceItem, discover, read_file
from aipipe.fhir.limits import DEFAULT_LIMITS, IngestLimits
from aipipe.fhir.mapping import MappedResource, ResourceRejected, map_resource
from aipipe.store.node_store import NodeStore, WriteOutcome, later

BATCH_SIZE = 5000  # one transaction per batch; larger batches re-dirty fewer index pages
# A resourceType that is not a type name is content, not a type: reported as `unknown`.
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")


@dataclass
class TypeCounts:
    read: int = 0
    stored: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    rejected: int = 0


@dataclass
class IngestReport:
    source: str
    types: dict[str, TypeCounts] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    files: int = 0
    # Where each rejection reason was first seen: `file:line` or `file#entryN`, never content.
    first_rejected: dict[str, str] = field(default_factory=dict)
    # The files of which nothing was stored, for the operator to look at.
    files_all_rejected: list[str] = field(default_factory=list)

    def reject(self, rtype: str, reason: str, origin: str) -> None:
        self.counts(rtype).rejected += 1
        self.reasons[reason] += 1
        self.first_rejected.setdefault(reason, origin)

    def counts(self, rtype: str) -> TypeCounts:
        return self.types.setdefault(rtype, TypeCounts())

    def total(self, name: str) -> int:
        return sum(getattr(counts, name) for counts in self.types.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files": self.files,
            "types": {t: vars(c) for t, c in sorted(self.types.items())},
            "totals": {name: self.total(name) for name in vars(TypeCounts())},
            "rejected_reasons": dict(self.reasons.most_common()),
            "first_rejected_at": dict(self.first_rejected),
            "files_all_rejected": list(self.files_all_rejected),
            "warnings": dict(self.warnings.most_common()),
        }


class ResourceSource(Protocol):
    """A server-like source: resources of one type updated after a cursor."""

    def iter_resources(self, resource_type: str, since: str | None) -> Iterator[dict[str, Any]]: ...


class _Writer:
    """Maps items, buffers them and writes full batches to the store, counting everything."""

    def __init__(
        self, store: NodeStore, report: IngestReport, limits: IngestLimits = DEFAULT_LIMITS
    ) -> None:
        self.store = store
        self.report = report
        self.limits = limits
        self.pending: list[MappedResource] = []
        self.max_updated: dict[str, str] = {}

    def add(self, item: SourceItem) -> None:
        rtype = _type_of(item)
        counts = self.report.counts(rtype)
        counts.read += 1
        if item.error is not None:
            self.report.reject(rtype, f"{rtype}: {item.error}", item.origin)
            return
        try:
            mapped = map_resource(item.resource, item.raw_text)
        except ResourceRejected as exc:
            self.report.reject(rtype, exc.reason, item.origin)
            return
        bound = self.limits.max_resource_bytes
        if item.raw_text is None and len(mapped.json.encode()) > bound:
            self.report.reject(rtype, f"{rtype}: resource larger than {bound} bytes", item.origin)
            return
        self.report.warnings.update(mapped.warnings)
        self.pending.append(mapped)
        if len(self.pending) >= BATCH_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        outcomes = self.store.write_batch(self.pending)
        for mapped, outcome in zip(self.pending, outcomes, strict=True):
            counts = self.report.counts(mapped.type)
            setattr(counts, outcome.value, getattr(counts, outcome.value) + 1)
            updated = mapped.last_updated
            if updated is not None and outcome is not WriteOutcome.STALE:
                current = self.max_updated.get(mapped.type)
                if current is None or later(updated, current):
                    self.max_updated[mapped.type] = updated
        self.pending.clear()


def _type_of(item: SourceItem) -> str:
    rtype = item.resource.get("resourceType") if isinstance(item.resource, dict) else None
    if isinstance(rtype, str) and _TYPE_NAME.match(rtype):
        return rtype
    return item.resource_type or "unknown"


def ingest_files(
    store: NodeStore,
    paths: list[Path],
    progress: Progress | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
) -> IngestReport:
    """Ingest NDJSON and Bundle files (directories expanded)."""
    files = discover(paths)
    report = IngestReport(source="files", files=len(files))
    started = utc_now()
    writer = _Writer(store, report, limits)
    for path in files:
        rejected_before, read_before = report.total("rejected"), report.total("read")
        for item in read_file(path, progress, limits):
            writer.add(item)
        read = report.total("read") - read_before
        if read and report.total("rejected") - rejected_before == read:
            report.files_all_rejected.append(str(path))
    writer.flush()
    store.record_run("files", started, json.dumps(report.to_dict()))
    return report


def total_bytes(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in discover(paths))


def ingest_server(
    store: NodeStore,
    source: ResourceSource,
    *,
    source_key: str,
    resource_types: Iterable[str],
    since: str | None = None,
    on_resource: Callable[[str], None] | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
) -> IngestReport:
    """Pull each type updated after its cursor (or `since`), then advance the cursors.

    A cursor moves only after that type's resources are committed, so an interrupted pull
    resumes where the last completed type left off and never skips a resource.
    """
    report = IngestReport(source=source_key)
    started = utc_now()
    for rtype in resource_types:
        writer = _Writer(store, report, limits)
        cursor = since if since is not None else store.cursor(source_key, rtype)
        report.counts(rtype)
        for resource in source.iter_resources(rtype, cursor):
            writer.add(SourceItem(resource, f"{rtype} search", resource_type=rtype))
            if on_resource is not None:
                on_resource(rtype)
        writer.flush()
        newest = writer.max_updated.get(rtype)
        if newest is not None and (cursor is None or later(newest, cursor)):
            store.set_cursor(source_key, rtype, newest)
    store.record_run(source_key, started, json.dumps(report.to_dict()))
    return report
