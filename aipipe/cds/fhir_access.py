"""Fetching what a CDS Client did not prefetch from its FHIR server (CDS Hooks 2.0,
"FHIR Resource Access"), with the bearer token the client passed in `fhirAuthorization`.

The server URL comes from the request, so it is checked before any connection is made: https
only (the spec: "The scheme MUST be https when production data is exchanged"; plain http only
where a deployment allows it), and only servers on the operator's allow-list (`allowed_servers`;
empty, the default, allows none): the same scheme, host and port as an entry, and a path equal to
or under the entry's path, with no user info, query, fragment or dot segments. TLS certificates
are always verified (`ca_bundle` adds a hospital's own CA), timeouts are short, redirects are not
followed, and paging links must stay under the server that was asked. A request that names a
fhirServer without `fhirAuthorization` is read without a token (the spec allows fhirServer alone;
open test servers answer that way). A read that finds nothing (404/410) is "no data"; a search
must answer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import certifi
import httpx

from aipipe import __version__
from aipipe.errors import FhirServerError
from aipipe.fhir.base_url import ServerBase


@dataclass(frozen=True)
class FetchResult:
    """Key → resource (None when the server has none: 404/410), and key → why it failed."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


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
    (a hospital's own CA). Certificate checks cannot be turned off.
    """

    timeout_s: float = 5.0
    max_pages: int = 20
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
        self, server: str, access_token: str | None, queries: Mapping[str, str]
    ) -> FetchResult:
        """GET each relative query (`Patient/1`, `Observation?patient=1&code=…`) concurrently."""
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
            answers = await asyncio.gather(
                *(self._read(client, base, key, queries[key]) for key in keys),
                return_exceptions=True,
            )
        result = FetchResult()
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, FhirServerError):
                result.errors[key] = str(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                result.values[key] = answer
        return result

    async def _read(self, client: httpx.AsyncClient, base: str, key: str, query: str) -> Any:
        read = "?" not in query  # a read may find nothing (404); a search answers a Bundle
        first = await _get_json(client, f"{base}/{query.lstrip('/')}", key, absent_ok=read)
        if first is None or first.get("resourceType") != "Bundle":
            return first
        entries = _entries(first)
        page = first
        server = ServerBase.parse(base)
        for _ in range(self.max_pages - 1):
            following = _next_link(page)
            if following is None:
                break
            if not _under(server, following):
                raise FhirServerError(f"the '{key}' search pages to another server; not followed")
            page = await _get_json(client, following, key, absent_ok=False) or {}
            entries.extend(_entries(page))
        else:
            if _next_link(page) is not None:
                raise FhirServerError(f"the '{key}' search has more than {self.max_pages} pages")
        merged = {k: v for k, v in first.items() if k != "link"}
        merged["entry"] = entries
        return merged


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
