"""What one CDS call may cost the service: bounded audit fields, a bounded name for a service id
the caller made up, and the rule that CDS without client JWTs is served on loopback only."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from aipipe.errors import ConfigError
from aipipe.tls import is_loopback

MAX_TEXT = 200  # characters of any one audited string
MAX_ITEMS = 20  # entries of any one audited list or object
MAX_DEPTH = 4
SERVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # ServiceDescriptor.id


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """`text`, cut to `limit` characters (marked with an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON-like value with every string, list and object cut to the limits above."""
    if isinstance(value, str):
        return clip(value)
    if depth >= MAX_DEPTH and isinstance(value, Mapping | list | tuple):
        return "…"
    if isinstance(value, Mapping):
        items = list(value.items())
        kept = {clip(str(k), 64): bounded(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            kept["…"] = f"{len(items) - MAX_ITEMS} more"
        return kept
    if isinstance(value, list | tuple):
        kept_list = [bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            kept_list.append(f"… {len(value) - MAX_ITEMS} more")
        return kept_list
    return value


def service_label(service_id: str) -> str:
    """How a service id from the URL is echoed and audited: itself when it could name a
    service (the discovery pattern, ≤ 128 characters), else a short hash of it."""
    if SERVICE_ID.fullmatch(service_id):
        return service_id
    digest = hashlib.sha256(service_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"invalid-id-sha256:{digest[:16]}"


def require_loopback(host: str, setting: str) -> None:
    """Raise `ConfigError` unless `host` is a loopback address: CDS without client JWTs
    (`setting`) is for one machine only (tests, a demo, or behind an authenticating proxy)."""
    if not is_loopback(host):
        raise ConfigError(
            f"{setting} serves CDS Hooks without client JWTs, which is allowed only on a "
            f"loopback address (127.0.0.1, ::1, localhost), not on {clip(host, 64)!r}; bind to "
            "127.0.0.1, or register the EHR's CDS clients (their JWK Sets) and drop the opt-out"
        )
