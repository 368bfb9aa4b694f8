"""The one clock: UTC now, the instant spelling every store and audit record uses, and the
conversions between stored instants and this process's monotonic clock.

Instants are stored as ISO 8601 UTC with microseconds and a ``Z`` suffix
(``2026-01-31T12:00:00.000000Z``, a valid FHIR instant), so they sort as text.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

INSTANT_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """`moment` (a UTC datetime) spelled as a stored instant."""
    return moment.strftime(INSTANT_FORMAT)


def utc_now() -> str:
    """The current time spelled as a stored instant."""
    return iso(now())


def parse_instant(instant: str) -> datetime:
    """A stored (or any ISO 8601) instant as an aware datetime; one without an offset is UTC.
    `ValueError` if it is not an instant."""
    moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def plus(instant: str, seconds: float) -> str:
    """The stored instant `seconds` after `instant`."""
    return iso(parse_instant(instant).astimezone(UTC) + timedelta(seconds=seconds))


def monotonic_deadline(instant: str) -> float:
    """The wall-clock `instant` on this process's monotonic clock (now if it has passed)."""
    left = (parse_instant(instant) - now()).total_seconds()
    return time.monotonic() + max(left, 0.0)
