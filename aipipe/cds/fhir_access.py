"""Fetching what a CDS Client did not prefetch from its FHIR server (CDS Hooks 2.0,
"FHIR Resource Access"), with the bearer token the client passed in `fhirAuthorization`.

The server URL comes from the request, so it is checked before any connection is made: https
only (the spec: "The scheme MUST be https when production data is exchanged"; plain http only
where a deployment allows it), and only servers on the operator's allow-list (`allowed_servers`;
empty, the default, allows none): the same scheme, host and port as an entry, and a path equal to
or under the entry's path, with no user info, query, fragment or dot segments. TLS certificates
are always verified (`ca_bundle` adds a hospital's own CA), timeouts are short, redirects are not
followed, and paging links must stay under the server that was asked. A search is paged to its
end within one budget for the whole request (`budget_s`, 20 s by default, at most `max_pages`
pages a search); a search cut short by the budget or the page cap, or stopped early because the
caller's `enough` test says the rest cannot change the answer, comes back in `partial` with what
was read and why it stopped. A request that names a
fhirServer without `fhirAuthorization` is read without a token (the spec allows fhirServer alone;
open test servers answer that way). A read that finds nothing (404/410) is "no data"; a search
must answer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import certifi
import httpx

from aipipe import __version__
from aipipe.errors import FhirServerError
from aipipe.fhir.base_url import ServerBase


@dataclass(frozen=True)
class FetchResult:
    """Key → resource (None when the server has none: 404/410), key → why it failed, and key →
    why a search's value holds only part of the result (its later pages were not read)."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)


EARLY_STOP = "the newest values the model reads were found; older pages not read"
"""`FetchResult.partial`'s reason when the caller's `enough` test stopped the paging."""

Enough = Callable[[list[Any]], bool]
"""Told the entries read so far (in the server's order), whether the later pages can be skipped."""


NOT_ALLOWED = (
    "the fhirServer is not on this service's allow-list of FHIR servers (set by its operator: "
    "hub.yaml cds_fhir_servers, `node serve-cds --fhir-allow URL`)"
)


@dataclass(frozen=True)
class FhirAccess:
    """How the service may call CDS Clients' FHIR servers.

    `allowed_servers` lists the FHIR base URLs the operator allows (none by default: every
    fhirServer is refused and the service answers from prefetch alone). `transport` replaces
    the network (tests); `ca_bundle` names a PEM file of extra trusted certificate authorities
    (a hospital's own CA). Certificate checks cannot be turned off. `budget_s` bounds the time
    one request spends reading (all its queries and pages together); `max_pages` bounds the
    pages of one search.
    """

    timeout_s: float = 5.0
    max_pages: int = 100
    budget_s: float = 20.0
    allowed_servers: tuple[str, ...] = ()
    allow_http: bool = False
    ca_bundle: str | None = None
    transport: httpx.AsyncBaseTransport | None = None
    _bases: tuple[ServerBase, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bases = []
        for allowed in self.allowed_servers:
            try:
                bases.append(ServerBase.parse(allowed))
            except ValueError as exc:
                raise ValueError(f"allowed FHIR server {allowed!r}: {exc}") from None
        object.__setattr__(self, "_bases", tuple(bases))
        self._verify()  # a missing or unreadable CA bundle fails here, not on the first call

    def refusal(self, server: str) -> str | None:
        """Why this service will not call `server`, or None when it may."""
        try:
            target = ServerBase.parse(server)
        except ValueError as exc:
            return f"the fhirServer is not a plain FHIR base URL ({exc})"
        if target.scheme != "https" and not self.allow_http:
            return "the fhirServer must use https"
        if not any(base.covers(target) for base in self._bases):
            return NOT_ALLOWED
        return None

    def _verify(self) -> ssl.SSLContext | bool:
        if self.ca_bundle is None:
            return True  # httpx's default: certifi's CAs, hostname checked
        context = ssl.create_default_context(cafile=certifi.where())
        context.load_verify_locations(cafile=self.ca_bundle)
        return context

    async def fetch(
        self,
        server: str,
        access_token: str | None,
        queries: Mapping[str, str],
        *,
        enough: Mapping[str, Enough] | None = None,
    ) -> FetchResult:
        """GET each relative query (`Patient/1`, `Observation?patient=1&code=…`) concurrently,
        paging each search until its end, `enough[key]` says stop, or the budget is spent."""
        reason = self.refusal(server)
        if reason is not None:
            return FetchResult(errors=dict.fromkeys(queries, reason))
        base = server.rstrip("/")
        headers = {"Accept": "application/fhir+json", "User-Agent": f"aipipe-cds/{__version__}"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        async with httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            verify=self._verify(),
            transport=self.transport,
            follow_redirects=False,
        ) as client:
            keys = list(queries)
            deadline = time.monotonic() + self.budget_s
            stops = enough or {}
            answers = await asyncio.gather(
                *(
                    self._read(client, base, key, queries[key], deadline, stops.get(key))
                    for key in keys
                ),
                return_exceptions=True,
            )
        result = FetchResult()
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, FhirServerError):
                result.errors[key] = str(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                result.values[key], stopped = answer
                if stopped is not None:
                    result.partial[key] = stopped
        return result

    async def _read(
        self,
        client: httpx.AsyncClient,
        base: str,
        key: str,
        query: str,
        deadline: float,
        enough: Enough | None,
    ) -> tuple[Any, str | None]:
        """The resource or merged searchset, and why later pages were not read (None: all were)."""
        read = "?" not in query  # a read may find nothing (404); a search answers a Bundle
        first = await _get_json(client, f"{base}/{query.lstrip('/')}", key, absent_ok=read)
        if first is None or first.get("resourceType") != "Bundle":
            return first, None
        entries = _entries(first)
        page, pages, stopped = first, 1, None
        server = ServerBase.parse(base)
        while (following := _next_link(page)) is not None:
            if enough is not None and enough(entries):
                stopped = EARLY_STOP
                break
            if pages >= self.max_pages:
                stopped = f"read {pages} pages, this service's limit for one search"
                break
            if time.monotonic() >= deadline:
                stopped = f"read {pages} pages within the {self.budget_s:g} s reading budget"
                break
            if not _under(server, following):
                raise FhirServerError(f"the '{key}' search pages to another server; not followed")
            page = await _get_json(client, following, key, absent_ok=False) or {}
            entries.extend(_entries(page))
            pages += 1
        merged = {k: v for k, v in first.items() if k != "link"}
        merged["entry"] = entries
        return merged, stopped


async def _get_json(
    client: httpx.AsyncClient, url: str, key: str, *, absent_ok: bool
) -> dict[str, Any] | None:
    try:
        response = await client.get(url)
    except httpx.TimeoutException:
        raise FhirServerError(f"the FHIR server did not answer the '{key}' query in time") from None
    except httpx.HTTPError as exc:
        raise FhirServerError(
            f"the FHIR server cannot be reached for the '{key}' query ({type(exc).__name__})"
        ) from None
    if absent_ok and response.status_code in (404, 410):
        return None
    if response.status_code != 200:
        raise FhirServerError(
            f"the FHIR server answered {response.status_code} to the '{key}' query"
        )
    try:
        body = response.json()
    except ValueError:
        raise FhirServerError(
            f"the FHIR server's answer to the '{key}' query is not JSON"
        ) from None
    if not isinstance(body, dict):
        raise FhirServerError(f"the FHIR server's answer to the '{key}' query is not a resource")
    return body


def _under(server: ServerBase, link: str) -> bool:
    try:
        return server.covers(ServerBase.parse(link, query_ok=True))
    except ValueError:
        return False


def _entries(bundle: Mapping[str, Any]) -> list[Any]:
    entries = bundle.get("entry")
    return list(entries) if isinstance(entries, list) else []


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if (
            isinstance(link, dict)
            and link.get("relation") == "next"
            and isinstance(link.get("url"), str)
        ):
            return str(link["url"])
    return None
