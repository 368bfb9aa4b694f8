"""Pull resources from a FHIR R4 server: type searches, paging, `_lastUpdated` cursors, retries.

`FhirServerSource` searches `[base]/[type]?_count=N[&_lastUpdated=gt<since>]&_sort=_lastUpdated`
and follows the Bundle's `next` links until there are none. Only links on the server's own origin
(scheme, host, port) and under its base path are followed: the auth header travels with every
request, and a link elsewhere would hand the token and our query to a host nobody configured.

Transient answers (429, 502, 503, 504, connection errors, timeouts) are retried with exponential
backoff, honouring `Retry-After`; anything else becomes a `FhirServerError` that names the server,
the status and the server's OperationOutcome diagnostics, never resource contents.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from aipipe.errors import ConfigError, FhirServerError
from aipipe.fhir.limits import DEFAULT_LIMITS, IngestLimits, depth_exceeds

__all__ = ["DEFAULT_TYPES", "FhirServerSource", "PullStats"]

DEFAULT_TYPES = (
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "DiagnosticReport",
)
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A server may ask for a long pause; past this we would rather fail and let the caller retry later
# than hang an ingest on a misconfigured gateway.
MAX_RETRY_AFTER_S = 120.0
# A page holds up to `_count` resources of up to `max_resource_bytes` each, but never more than
# this: a page is parsed whole, so its size is what one pull can take in memory.
MAX_PAGE_BYTES = 64 * 1024 * 1024
# Servers cap `_count` differently (sekmet and HAPI at 1000); above that they silently page smaller.
MAX_PAGE_SIZE = 1000
FHIR_JSON = "application/fhir+json"
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
# FHIR dateTime/instant; a time needs a zone so that `gt` compares the instant that was meant.
_SINCE_RE = re.compile(
    r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?)?)?$"
)


@dataclass
class PullStats:
    """What one `iter_resources` call saw, for the ingest report (counts only, no contents)."""

    resource_type: str
    total: int | None = None  # Bundle.total of the first page, when the server gives one
    pages: int = 0
    resources: int = 0
    outcomes: int = 0  # OperationOutcome entries (search.mode = outcome), e.g. ignored parameters
    skipped: int = 0  # entries without a resource of the searched type (includes, malformed)


class FhirServerSource:
    """Reads resources of one type at a time from a FHIR R4 server over REST search.

    `max_retries` counts retries after the first try; backoff doubles from `backoff_s` unless the
    server sends `Retry-After`. `auth` signs every request (SMART Backend Services plugs in here);
    `transport` and `sleep` let tests script the server and the clock. Close it, or use `with`.
    """

    def __init__(
        self,
        *,
        base_url: str,
        page_size: int = 100,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 30.0,
        sort_by_last_updated: bool = True,
        auth: httpx.Auth | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        limits: IngestLimits = DEFAULT_LIMITS,
    ) -> None:
        self.base_url = _check_base_url(base_url)
        _check_range("page_size", page_size, 1, MAX_PAGE_SIZE)
        _check_range("max_retries", max_retries, 0, 20)
        _check_range("backoff_s", backoff_s, 0.0, 60.0)
        _check_range("timeout_s", timeout_s, 0.1, 600.0)
        self.page_size = page_size
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.sort_by_last_updated = sort_by_last_updated
        self.limits = limits
        # The page bound follows the resource bound, so a test (or a site) lowering one lowers both.
        self.max_page_bytes = min(MAX_PAGE_BYTES, limits.max_resource_bytes * 4)
        self.last_pull: PullStats | None = None
        self._sleep = sleep
        self._client = httpx.Client(
            auth=auth,
            transport=transport,
            timeout=timeout_s,
            headers={"Accept": FHIR_JSON},
            follow_redirects=False,  # a redirect could leave the server, like an off-host link
        )

    def __enter__(self) -> FhirServerSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement, after checking that it speaks FHIR R4 (4.0.x)."""
        statement = self._get_json(f"{self.base_url}/metadata", None)
        version = str(statement.get("fhirVersion", "unknown"))
        if statement.get("resourceType") != "CapabilityStatement" or not version.startswith("4.0."):
            raise FhirServerError(
                f"FHIR server at {self.base_url} reports FHIR version {version}, aipipe needs "
                f"R4 (4.0.x); point the FHIR URL at the server's R4 endpoint"
            )
        return statement

    def iter_resources(
        self, resource_type: str, since: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield every resource of `resource_type`, only those updated after `since` if given.

        `since` is a FHIR instant, typically the largest `meta.lastUpdated` of the previous pull.
        Counts land in `self.last_pull` as pages arrive.
        """
        if not _TYPE_RE.match(resource_type):
            raise ConfigError(f"{resource_type!r} is not a FHIR resource type name")
        if since is not None and not _SINCE_RE.match(since):
            raise ConfigError(f"cursor {since!r} is not a FHIR instant (e.g. 2024-05-01T10:00:00Z)")
        stats = self.last_pull = PullStats(resource_type)
        url: str | None = f"{self.base_url}/{resource_type}"
        params: httpx.QueryParams | None = self._search_params(since)
        seen: set[str] = set()
        while url is not None:
            bundle = self._get_json(url, params)
            if stats.pages == 0 and isinstance(bundle.get("total"), int):
                # Offset-paging servers can skip a resource when another moves during the pull;
                # a caller that sees fewer resources than this total knows to pull again.
                stats.total = bundle["total"]
            stats.pages += 1
            yield from _bundle_resources(bundle, resource_type, stats)
            url, params = self._next_url(bundle, url, seen), None

    def _search_params(self, since: str | None) -> httpx.QueryParams:
        params = httpx.QueryParams({"_count": str(self.page_size)})
        if since is not None:
            params = params.add("_lastUpdated", f"gt{since}")
        if self.sort_by_last_updated:
            # Oldest first: a resource updated while we page moves to the end, where we see it.
            params = params.add("_sort", "_lastUpdated")
        return params

    def _next_url(self, bundle: dict[str, Any], current: str, seen: set[str]) -> str | None:
        links = bundle.get("link") or []
        href = next((link.get("url") for link in links if link.get("relation") == "next"), None)
        if not href:
            return None
        url = urljoin(current, str(href))
        if not _same_server(url, self.base_url):
            raise FhirServerError(
                f"FHIR server at {self.base_url} sent a next-page link to "
                f"{_origin(url)}, another server; refusing to follow it. If the server is "
                f"reached through a proxy, configure its public base URL to match"
            )
        if url in seen:
            raise FhirServerError(
                f"FHIR server at {self.base_url} sent the same next-page link twice; "
                f"its paging loops, stopping"
            )
        seen.add(url)
        return url

    def put_conditional(
        self, resource_type: str, search: dict[str, str], resource: dict[str, Any]
    ) -> dict[str, Any]:
        """Conditional update (`PUT [base]/Type?search`): creates the resource when nothing
        matches, updates the one match, refuses several matches (412). PUT is idempotent, so
        it is retried like a read."""
        url = f"{self.base_url}/{resource_type}"
        return self._send("PUT", url, httpx.QueryParams(search), resource)

    def _get_json(self, url: str, params: httpx.QueryParams | None) -> dict[str, Any]:
        """GET with retries on transient failures; the parsed JSON object, or FhirServerError."""
        return self._send("GET", url, params, None)

    def _send(
        self, method: str, url: str, params: httpx.QueryParams | None, body: Any
    ) -> dict[str, Any]:
        attempt = 0
        while True:
            last = attempt >= self.max_retries
            try:
                headers = {"Content-Type": FHIR_JSON} if body is not None else None
                response = self._request(method, url, params, body, headers)
            except httpx.TransportError as exc:
                if last:
                    raise FhirServerError(self._unreachable(exc)) from exc
                self._sleep(self._backoff(attempt))
            else:
                if response.status_code not in RETRY_STATUSES or last:
                    return self._parse(response)
                self._sleep(self._backoff(attempt, _retry_after(response)))
            attempt += 1

    def _request(
        self,
        method: str,
        url: str,
        params: httpx.QueryParams | None,
        body: Any,
        headers: dict[str, str] | None,
    ) -> httpx.Response:
        """Send, and read at most `max_page_bytes` of the answer (streamed, never more)."""
        request = self._client.build_request(method, url, params=params, json=body, headers=headers)
        response = self._client.send(request, stream=True)
        try:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_page_bytes:
                    raise FhirServerError(
                        f"FHIR server at {self.base_url} answered {request.url.path} with more "
                        f"than {self.max_page_bytes} bytes; lower --page-size"
                    )
                chunks.append(chunk)
        finally:
            response.close()
        # Already decoded: drop the encoding headers so the new response does not decode again.
        kept = [
            (key, value)
            for key, value in response.headers.multi_items()
            if key.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=kept, content=b"".join(chunks), request=request
        )

    def _backoff(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return float(self.backoff_s * 2**attempt)

    def _parse(self, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if status in RETRY_STATUSES:
            raise FhirServerError(
                f"FHIR server at {self.base_url} still answered {status} after "
                f"{self.max_retries + 1} tries; it is overloaded or down, try again later"
            )
        if status >= 300:
            raise FhirServerError(self._refused(response))
        content = response.content
        if depth_exceeds(content, self.limits.max_depth + 3):  # Bundle.entry[].resource
            raise FhirServerError(
                f"FHIR server at {self.base_url} answered {response.request.url.path} with JSON "
                f"nested deeper than {self.limits.max_depth} levels; refusing to parse it"
            )
        try:
            body = json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise FhirServerError(
                f"FHIR server at {self.base_url} answered {response.request.url.path} with "
                f"something that is not JSON ({response.headers.get('content-type', 'no type')})"
            ) from exc
        if not isinstance(body, dict):
            raise FhirServerError(f"FHIR server at {self.base_url} answered with a non-object")
        return body

    def _refused(self, response: httpx.Response) -> str:
        status = response.status_code
        what = f"{response.request.method} {response.request.url.path}"
        message = f"FHIR server at {self.base_url} answered {status} to {what}"
        diagnostics = _outcome_diagnostics(response)
        if diagnostics:
            message += f": {diagnostics}"
        if status in (401, 403):
            message += "; check the client credentials and the scopes granted to this client"
        return message

    def _unreachable(self, exc: httpx.TransportError) -> str:
        tries = f" after {self.max_retries + 1} tries" if self.max_retries else ""
        where = f"cannot reach FHIR server at {self.base_url}"
        if isinstance(exc, httpx.TimeoutException):
            return f"{where}: no answer within {self.timeout_s:g} s{tries}; is it overloaded?"
        reason = str(exc).lower()
        if "refused" in reason:
            return f"{where}: connection refused{tries}; is it running?"
        if "ssl" in reason or "certificate" in reason:
            return f"{where}: TLS failed ({exc}); check the server's certificate"
        return f"{where}: {exc or type(exc).__name__}{tries}; check the URL and the network"


def _bundle_resources(
    bundle: dict[str, Any], resource_type: str, stats: PullStats
) -> Iterator[dict[str, Any]]:
    if bundle.get("resourceType") != "Bundle":
        raise FhirServerError(
            f"FHIR search for {resource_type} answered with a "
            f"{bundle.get('resourceType', 'non-FHIR object')}, not a Bundle"
        )
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        mode = (entry.get("search") or {}).get("mode") if isinstance(entry, dict) else None
        if mode == "outcome":
            stats.outcomes += 1
        elif isinstance(resource, dict) and resource.get("resourceType") == resource_type:
            stats.resources += 1
            yield resource
        else:
            stats.skipped += 1


def _outcome_diagnostics(response: httpx.Response, limit: int = 300) -> str:
    """The OperationOutcome's issue texts, if the error body is one; servers put no PHI there."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in body.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if text:
            texts.append(str(text))
    joined = "; ".join(texts)
    return joined if len(joined) <= limit else joined[: limit - 1] + "…"


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds asked for by `Retry-After` (delta-seconds or an HTTP date), if present and valid."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _check_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(
            f"FHIR URL {base_url!r} is not an http(s) base URL like https://ehr.example.org/fhir"
        )
    return base_url.rstrip("/")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _same_server(url: str, base_url: str) -> bool:
    """Same scheme, host and port as the base URL, and a path at or below its path."""
    target, base = urlsplit(url), urlsplit(base_url)
    if (target.scheme, target.hostname, _port(target)) != (base.scheme, base.hostname, _port(base)):
        return False
    root = base.path.rstrip("/")
    return not root or target.path == root or target.path.startswith(root + "/")


def _port(parts: SplitResult) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
