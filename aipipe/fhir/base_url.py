"""FHIR base URLs taken apart, to compare a URL from a request with an operator's allow-list:
exact origin (scheme, host, port) and a path prefix on segment boundaries. Standard library only,
so configuration models can validate their entries without importing an HTTP client."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class ServerBase:
    """A FHIR base URL taken apart: scheme, host, port and path (no trailing slash)."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, *, query_ok: bool = False) -> ServerBase:
        """Raise `ValueError` saying why `url` is not a plain http(s) base URL."""
        if any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
            raise ValueError("it holds spaces, control characters or backslashes")
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("it is not an absolute http(s) URL")
        if "@" in parts.netloc or "%" in parts.netloc:
            raise ValueError("it carries user info or an escaped host")
        if parts.fragment or "#" in url or (not query_ok and (parts.query or "?" in url)):
            raise ValueError("a FHIR base URL has no query or fragment")
        lowered = parts.path.lower()
        if (
            "%2f" in lowered
            or "%5c" in lowered
            or any(segment in (".", "..") for segment in unquote(parts.path).split("/"))
        ):
            raise ValueError("its path has dot segments or escaped slashes")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, parts.port or default, parts.path.rstrip("/"))

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def covers(self, other: ServerBase) -> bool:
        """`other` is this server, or a path under it."""
        return (other.scheme, other.host, other.port) == (self.scheme, self.host, self.port) and (
            other.path == self.path or other.path.startswith(self.path + "/")
        )


def origin_of(url: str) -> str:
    """`scheme://host:port` of a URL, for the audit log (never its path or query)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "?"
    except ValueError:
        return "(not a URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme[:8]}://{host[:100]}:{port}"
