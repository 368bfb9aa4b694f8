"""Walk a Bundle file's top level with ijson's raw events, building one entry at a time.

ijson's `items()` keeps a dotted prefix per nesting level, so a Bundle nested 50,000 levels deep
costs memory quadratic in the depth (6 GB for a 100 KB file). Here the events come from
`basic_parse` (no prefixes), entries are built by `_Builder`, which stops building past the depth
or size bound and only counts brackets until the entry ends, and the file handle is wrapped in a
`GuardedReader`, so one enormous string is refused before it is buffered whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import ijson

from aipipe.fhir.limits import GuardedReader, IngestLimits, TokenTooLargeError

BUFFER = 64 * 1024
_STARTS = frozenset({"start_map", "start_array"})
_ENDS = frozenset({"end_map", "end_array"})

Event = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry that was not built; `reason` names the bound, never the content."""

    reason: str


@dataclass(frozen=True, slots=True)
class WalkItem:
    """One thing found at a Bundle's top level: its resourceType, an entry, or damage."""

    kind: str  # "resourceType", "entry" or "damage"
    value: Any


class _Builder:
    """Builds one JSON value from events, within the depth and size bounds."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.stack: list[tuple[Any, str | None]] = []  # (container or None when skipping, key)
        self.size = 0
        self.reason: str | None = None
        self.root: Any = None

    def feed(self, event: str, value: Any) -> bool:
        """Take one event; True once the value is complete."""
        if event in _ENDS:
            container, _ = self.stack.pop()
            if self.stack:
                self._add(container)
            else:
                self.root = container
            return not self.stack
        if event == "map_key":
            self.size += len(value) + 3
            container, _ = self.stack[-1]
            self.stack[-1] = (container, value)
        elif event in _STARTS:
            self.size += 1
            self.stack.append(({} if event == "start_map" else [], None))
            if len(self.stack) > self.limits.max_depth:
                self._refuse(f"nested deeper than {self.limits.max_depth} levels")
        else:
            self.size += len(value) + 2 if isinstance(value, str) else 8
            self._add(value)
        if self.size > self.limits.max_resource_bytes:
            self._refuse(f"resource larger than {self.limits.max_resource_bytes} bytes")
        return False

    def _add(self, value: Any) -> None:
        container, key = self.stack[-1]
        if isinstance(container, dict):
            container[key] = value
        elif isinstance(container, list):
            container.append(value)

    def _refuse(self, reason: str) -> None:
        """Drop what was built; keep only the nesting, to find where the value ends."""
        if self.reason is None:
            self.reason = reason
        self.stack = [(None, None)] * len(self.stack)

    def result(self) -> Any:
        return Rejected(self.reason) if self.reason is not None else self.root


def build(first: Event, events: Iterator[Event], limits: IngestLimits) -> Any:
    """The value that starts with `first`, or `Rejected` when it breaks a bound."""
    event, value = first
    if event not in _STARTS:
        return value
    builder = _Builder(limits)
    builder.feed(event, value)
    for event, value in events:
        if builder.feed(event, value):
            break
    return builder.result()


def _skip(first: Event, events: Iterator[Event]) -> None:
    depth = 1 if first[0] in _STARTS else 0
    while depth:
        event, _ = next(events)
        depth += 1 if event in _STARTS else -1 if event in _ENDS else 0


def _events(reader: GuardedReader) -> Iterator[Event]:
    for event, value in ijson.basic_parse(reader, use_float=True, buf_size=BUFFER):
        reader.mark()
        yield event, value


def walk_bundle(handle: IO[bytes], limits: IngestLimits) -> Iterator[WalkItem]:
    """The top-level resourceType and each `entry` item of the JSON object in `handle`.

    Damage (invalid or truncated JSON, a value too large to buffer) ends the walk with a
    `damage` item whose value says what kind and after which entry, never the text around it.
    """
    reader = GuardedReader(handle, limits.max_resource_bytes + BUFFER)
    events = _events(reader)
    entries = 0
    try:
        if next(events, ("", None))[0] != "start_map":
            yield WalkItem("damage", "the file does not hold a JSON object")
            return
        for event, key in events:
            if event == "end_map":
                return
            first = next(events)
            if key == "entry" and first[0] == "start_array":
                for item in events:
                    if item[0] == "end_array":
                        break
                    yield WalkItem("entry", build(item, events, limits))
                    entries += 1
            elif key == "resourceType" and first[0] == "string":
                yield WalkItem("resourceType", first[1])
            else:
                _skip(first, events)
    except (ijson.JSONError, ijson.IncompleteJSONError, StopIteration) as exc:
        yield WalkItem("damage", f"{damage_kind(exc)} after entry {entries}")
    except TokenTooLargeError:
        size = limits.max_resource_bytes
        yield WalkItem("damage", f"a value larger than {size} bytes after entry {entries}")


def damage_kind(exc: Exception) -> str:
    """A fixed description of a JSON parser error: its messages quote the text around the
    damage, which may be a patient's name, so none of the message is passed on."""
    message = str(exc)
    if isinstance(exc, StopIteration) or "premature EOF" in message or "Incomplete" in message:
        return "truncated"
    if "UTF8" in message or "UTF-8" in message or isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8"
    return "invalid JSON"
