"""Ingest: FHIR sources → mapping → `NodeStore`, in batches, with a per-type report.

Bad input never stops an ingest: an unreadable line or entry, a resource without identity or
subject, a string where a number belongs, a truncated file, each is counted under its type (or
`unknown`) with its reason, and the rest of the input is stored. Reports carry counts and
reasons, never resource contents.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aipipe.fhir.files import Progress, SourceItem, discover, read_file
from aipipe.fhir.mapping import MappedResource, ResourceRejected, map_resource
from aipipe.store.node_store import NodeStore, WriteOutcome, later, utc_now

BATCH_SIZE = 5000  # one transaction per batch; larger batches re-dirty fewer index pages


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
            "warnings": dict(self.warnings.most_common()),
        }


class ResourceSource(Protocol):
    """A server-like source: resources of one type updated after a cursor."""

    def iter_resources(self, resource_type: str, since: str | None) -> Iterator[dict[str, Any]]: ...


class _Writer:
    """Maps items, buffers them and writes full batches to the store, counting everything."""

    def __init__(self, store: NodeStore, report: IngestReport) -> None:
        self.store = store
        self.report = report
        self.pending: list[MappedResource] = []
        self.max_updated: dict[str, str] = {}

    def add(self, item: SourceItem) -> None:
        rtype = _type_of(item)
        counts = self.report.counts(rtype)
        counts.read += 1
        if item.error is not None:
            counts.rejected += 1
            self.report.reasons[f"{rtype}: {item.error}"] += 1
            return
        try:
            mapped = map_resource(item.resource, item.raw_text)
        except ResourceRejected as exc:
            counts.rejected += 1
            self.report.reasons[exc.reason] += 1
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
    if isinstance(item.resource, dict) and isinstance(item.resource.get("resourceType"), str):
        return str(item.resource["resourceType"])
    return item.resource_type or "unknown"


def ingest_files(
    store: NodeStore, paths: list[Path], progress: Progress | None = None
) -> IngestReport:
    """Ingest NDJSON and Bundle files (directories expanded)."""
    files = discover(paths)
    report = IngestReport(source="files", files=len(files))
    started = utc_now()
    writer = _Writer(store, report)
    for path in files:
        for item in read_file(path, progress):
            writer.add(item)
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
) -> IngestReport:
    """Pull each type updated after its cursor (or `since`), then advance the cursors.

    A cursor moves only after that type's resources are committed, so an interrupted pull
    resumes where the last completed type left off and never skips a resource.
    """
    report = IngestReport(source=source_key)
    started = utc_now()
    for rtype in resource_types:
        writer = _Writer(store, report)
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
