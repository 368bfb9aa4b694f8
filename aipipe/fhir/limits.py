"""Bounds on what one FHIR resource may be before ingest builds it in memory.

A hostile or broken export can hold a line of gigabytes (or a gzip member that expands to one),
or a resource nested 100,000 levels deep: parsing the first takes several times its size in
memory, the second overflows the parser's stack (`RecursionError`) or, through ijson's prefixes,
takes memory quadratic in the depth. Every reader checks these bounds *before* it parses, so
such a resource is counted as rejected with a reason while memory stays flat.

Real FHIR resources stay far inside both: Synthea's deepest resources are about 10 levels deep,
nested Questionnaire items rarely pass 30; the largest are DocumentReferences with inline
attachments of a few MB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO, Any

from aipipe.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DEPTH",
    "MAX_RESOURCE_BYTES",
    "GuardedReader",
    "IngestLimits",
    "TokenTooLargeError",
    "depth_exceeds",
    "tree_depth_exceeds",
]

MAX_DEPTH = 100  # JSON levels (objects and arrays); well below Python's recursion limit
MAX_RESOURCE_BYTES = 16 * 1024 * 1024  # one NDJSON line, Bundle entry or single-resource file

# A JSON string with its escapes: removed before brackets are counted, so "[" in text is not one.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """How deep and how large one resource may be; the defaults suit every real export seen."""

    max_depth: int = MAX_DEPTH
    max_resource_bytes: int = MAX_RESOURCE_BYTES

    def __post_init__(self) -> None:
        if not 2 <= self.max_depth <= 500:
            raise ConfigError(f"max_depth must be between 2 and 500, got {self.max_depth}")
        if self.max_resource_bytes < 64:
            raise ConfigError(
                f"max_resource_bytes must be at least 64, got {self.max_resource_bytes}"
            )


DEFAULT_LIMITS = IngestLimits()


def depth_exceeds(text: bytes, limit: int) -> bool:
    """True if the JSON `text` nests objects and arrays deeper than `limit`, without parsing it.

    Strings are cut out, then each round deletes the innermost `[]` and `{}` pairs; a text
    still holding brackets after `limit` rounds is deeper than `limit` (or malformed, which the
    parser would refuse anyway). Each round runs at C speed, and there are at most `limit`.
    A text with no more openings than `limit` cannot be deeper; counting them first (memchr
    speed) skips the string scan for 96 % of real resources (bench/ingest.py's Synthea mix).
    """
    if text.count(b"{") + text.count(b"[") <= limit:
        return False
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            # Mismatched brackets: invalid JSON. Short leftovers are safe to hand to the parser
            # (it reports them); a long one could still nest deeper than the bound.
            return len(brackets) > limit
        brackets = shorter
    return bool(brackets)


def tree_depth_exceeds(node: Any, limit: int) -> bool:
    """True if a parsed JSON value nests deeper than `limit` (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class TokenTooLargeError(Exception):
    """A streaming parser read more than the bound without finishing one token."""


class GuardedReader:
    """A binary file wrapper for a streaming parser: refuses to feed it more than `limit` bytes
    between two calls of `mark()`, so a single multi-gigabyte token is never buffered whole."""

    def __init__(self, handle: IO[bytes], limit: int) -> None:
        self._handle = handle
        self._limit = limit
        self._since_mark = 0
        self.position = 0

    def mark(self) -> None:
        self._since_mark = 0

    def read(self, size: int = -1) -> bytes:
        if self._since_mark > self._limit:
            raise TokenTooLargeError(f"more than {self._limit} bytes without a complete value")
        data = self._handle.read(size if size >= 0 else self._limit)
        self._since_mark += len(data)
        self.position += len(data)
        return data
