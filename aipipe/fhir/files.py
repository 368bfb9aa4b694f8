"""Read FHIR resources from files: Bulk Data NDJSON and Bundle JSON, streamed.

NDJSON is read line by line. A Bundle is read with ijson in two passes, so memory stays flat
however large the file: the first pass maps each entry's `fullUrl` to `Type/id`, the second
yields the resources with `urn:uuid:` (and other fullUrl) references rewritten to `Type/id`, as a
FHIR server does when it processes a transaction. A resource known only by its `urn:uuid:`
fullUrl gets the uuid as its id, so ingesting the same bundle twice is idempotent.

Every line, entry and single-resource file is held to `IngestLimits` (depth, bytes) before it
is parsed; one that breaks a bound is yielded as an error naming the bound, never its content.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from aipipe.errors import SourceError
from aipipe.fhir.limits import DEFAULT_LIMITS, IngestLimits, depth_exceeds
from aipipe.fhir.stream import Rejected, walk_bundle

_UUID_URN = re.compile(r"^urn:uuid:([A-Za-z0-9\-.]{1,64})$")
_SUFFIXES = (".ndjson", ".ndjson.gz", ".json", ".json.gz")

_SKIP_CHUNK = 1 << 20  # an over-long line is read past in pieces of this size

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One resource read from a file, or the reason it could not be read."""

    resource: Any
    origin: str
    raw_text: str | None = None
    error: str | None = None
    resource_type: str | None = None


def discover(paths: list[Path]) -> list[Path]:
    """The FHIR files named by `paths`, directories expanded (sorted, recursively)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and _is_fhir(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise SourceError(f"no such file or directory: {path}")
    if not found:
        raise SourceError("no .ndjson or .json files found in " + ", ".join(map(str, paths)))
    return found


def _is_fhir(path: Path) -> bool:
    return path.name.lower().endswith(_SUFFIXES)


def _open(path: Path) -> IO[bytes]:
    try:
        if path.name.lower().endswith(".gz"):
            return cast(IO[bytes], gzip.open(path, "rb"))
        return path.open("rb")
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from exc


def read_file(
    path: Path, progress: Progress | None = None, limits: IngestLimits = DEFAULT_LIMITS
) -> Iterator[SourceItem]:
    name = path.name.lower()
    if name.endswith((".ndjson", ".ndjson.gz")):
        yield from read_ndjson(path, progress, limits)
    else:
        yield from read_bundle(path, progress, limits)


def read_ndjson(
    path: Path, progress: Progress | None = None, limits: IngestLimits = DEFAULT_LIMITS
) -> Iterator[SourceItem]:
    name = path.name
    with _open(path) as handle:
        for number, (line, length) in enumerate(_bounded_lines(handle, limits), start=1):
            if progress is not None:
                progress(length)
            origin = f"{name}:{number}"
            if line is None:
                error = f"line larger than {limits.max_resource_bytes} bytes"
                yield SourceItem(None, origin, error=error)
                continue
            text = line.strip()
            if text:
                yield from _parse_line(text, origin, name, limits)


def _bounded_lines(handle: IO[bytes], limits: IngestLimits) -> Iterator[tuple[bytes | None, int]]:
    """Each line with its length; None in place of a line over the bound, which is read past
    in pieces and never held whole (a gzip member can expand to gigabytes of one line)."""
    bound = limits.max_resource_bytes
    while line := handle.readline(bound + 1):
        if len(line) <= bound or line.endswith(b"\n"):
            yield line, len(line)
            continue
        length = len(line)
        while line and not line.endswith(b"\n"):
            line = handle.readline(_SKIP_CHUNK)
            length += len(line)
        yield None, length


def _parse_line(text: bytes, origin: str, name: str, limits: IngestLimits) -> Iterator[SourceItem]:
    if depth_exceeds(text, limits.max_depth):
        yield SourceItem(None, origin, error=f"nested deeper than {limits.max_depth} levels")
        return
    try:
        decoded = text.decode("utf-8")
        resource = json.loads(decoded)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        yield SourceItem(None, origin, error="invalid JSON line")
        return
    if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
        yield from _bundle_entries(resource, origin)
        return
    yield SourceItem(resource, name, raw_text=decoded)


def _bundle_entries(bundle: dict[str, Any], origin: str) -> Iterator[SourceItem]:
    entries: list[Any] = bundle["entry"] if isinstance(bundle.get("entry"), list) else []
    urls = dict(identity for e in entries if (identity := _entry_identity(e)) is not None)
    for index, entry in enumerate(entries):
        yield _resolve_entry(entry, urls, f"{origin}#entry{index}")


def read_bundle(
    path: Path, progress: Progress | None = None, limits: IngestLimits = DEFAULT_LIMITS
) -> Iterator[SourceItem]:
    """Stream a Bundle (or a single resource) from a JSON file."""
    size = path.stat().st_size
    urls: dict[str, str] = {}
    kind: str | None = None
    with _open(path) as handle:
        for item in walk_bundle(handle, limits):
            if item.kind == "resourceType":
                kind = item.value
            elif item.kind == "entry" and (identity := _entry_identity(item.value)) is not None:
                urls[identity[0]] = identity[1]
            elif item.kind == "damage" and kind == "Bundle":
                # Entries before the damage are still good: the second pass yields them.
                yield SourceItem(None, path.name, error=f"truncated or invalid JSON ({item.value})")
    if kind != "Bundle":
        yield from _single_resource(path, progress, limits)
        return
    reported = 0
    with _open(path) as handle:
        index = 0
        for item in walk_bundle(handle, limits):
            if item.kind != "entry":
                continue
            yield _entry_item(item.value, urls, f"{path.name}#entry{index}")
            index += 1
            if progress is not None:
                position = min(handle.tell(), size)
                progress(position - reported)
                reported = position
    if progress is not None:
        progress(size - reported)


def _entry_item(entry: Any, urls: dict[str, str], origin: str) -> SourceItem:
    if isinstance(entry, Rejected):
        return SourceItem(None, origin, error=entry.reason)
    return _resolve_entry(entry, urls, origin)


def _single_resource(
    path: Path, progress: Progress | None, limits: IngestLimits
) -> Iterator[SourceItem]:
    bound = limits.max_resource_bytes
    try:
        with _open(path) as handle:
            text = handle.read(bound + 1)
    finally:
        if progress is not None:
            progress(os.path.getsize(path))
    if len(text) > bound:
        yield SourceItem(None, path.name, error=f"resource larger than {bound} bytes")
        return
    if depth_exceeds(text, limits.max_depth):
        error = f"nested deeper than {limits.max_depth} levels"
        yield SourceItem(None, path.name, error=error)
        return
    try:
        resource = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        yield SourceItem(None, path.name, error="invalid JSON")
        return
    yield SourceItem(resource, path.name)


def _entry_identity(entry: Any) -> tuple[str, str] | None:
    """(fullUrl, `Type/id`) for an entry whose resource can be referenced by its fullUrl."""
    if not isinstance(entry, dict) or not isinstance(entry.get("fullUrl"), str):
        return None
    resource = entry.get("resource")
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return None
    rid = resource.get("id")
    if not isinstance(rid, str):
        match = _UUID_URN.match(entry["fullUrl"])
        if match is None:
            return None
        rid = match.group(1)
    return entry["fullUrl"], f"{resource['resourceType']}/{rid}"


def _resolve_entry(entry: Any, urls: dict[str, str], origin: str) -> SourceItem:
    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
        return SourceItem(None, origin, error="bundle entry has no resource")
    search = entry.get("search")
    if isinstance(search, dict) and search.get("mode") == "outcome":
        return SourceItem(None, origin, error="search outcome entry (OperationOutcome) skipped")
    request = entry.get("request")
    if isinstance(request, dict) and request.get("method") == "DELETE":
        return SourceItem(None, origin, error="DELETE entries are not applied")
    resource: dict[str, Any] = entry["resource"]
    if "id" not in resource and isinstance(entry.get("fullUrl"), str):
        match = _UUID_URN.match(entry["fullUrl"])
        if match is not None:
            resource = {**resource, "id": match.group(1)}
    return SourceItem(_rewrite_references(resource, urls), origin)


def _rewrite_references(node: Any, urls: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {key: _rewrite_references(value, urls) for key, value in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in urls:
            out["reference"] = urls[ref]
        return out
    if isinstance(node, list):
        return [_rewrite_references(item, urls) for item in node]
    return node
