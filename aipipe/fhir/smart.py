"""SMART Backend Services auth (SMART App Launch 2.x) for every FHIR call the node makes.

The node holds an asymmetric key (`SmartKey`, ES384 by default, RS384 on request) whose public
JWK Set the EHR team registers for the node's `client_id`. `SmartBackendAuth` then follows the
Backend Services steps: it reads `token_endpoint` from `[base]/.well-known/smart-configuration`,
signs a one-time client assertion (`client-confidential-asymmetric`: header `alg`, `kid`,
`typ: JWT`; claims `iss = sub = client_id`, `aud` = the token URL, `exp` at most five minutes
ahead, a fresh `jti`), POSTs a `client_credentials` grant and presents the access token as
`Authorization: Bearer`. The token is cached and renewed before it expires; a 401 from the FHIR
server gets one retry with a fresh token (the EHR may revoke or shorten tokens early).

Neither the assertion nor the access token is ever logged or put in an error message.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from aipipe.errors import ConfigError, FhirServerError
from aipipe.fhir.smart_key import SmartKey, jwk_thumbprint
from aipipe.secure.at_rest import PLAIN, AtRest

__all__ = [
    "DEFAULT_SCOPES",
    "SmartAuthError",
    "SmartBackendAuth",
    "SmartKey",
    "jwk_thumbprint",
    "smart_auth_for",
]

DEFAULT_SCOPES = (
    "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationRequest.rs "
    "system/MedicationStatement.rs system/DiagnosticReport.rs system/RiskAssessment.cu"
)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# client-confidential-asymmetric: `exp` "SHALL be no more than five minutes in the future".
ASSERTION_LIFETIME_S = 300
# Renew this long before expiry (at most half the lifetime, for EHRs that issue short tokens).
RENEW_BEFORE_S = 60.0
# Backend Services: expires_in "SHOULD NOT exceed 300"; assumed when a server leaves it out.
ASSUMED_TOKEN_LIFETIME_S = 300
# SMART v2 clinical scope: context/type.permissions[?query]; permissions an in-order subset of
# cruds, or a v1 suffix (read, write, *).
_CLINICAL_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)(\?\S*)?$")
_V2_PERMISSIONS = re.compile(r"^c?r?u?d?s?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


class SmartAuthError(FhirServerError):
    """The EHR's SMART authorization server refused this node, or cannot be used at all."""


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    renew_at: float
    scope: str


class SmartBackendAuth(httpx.Auth):
    """`httpx.Auth` that gets, caches and renews SMART Backend Services access tokens.

    Synchronous only (`httpx.Client`): token requests run on a client of its own, under a lock
    so that threads sharing one instance fetch one token. `token_url` skips discovery;
    `transport` and `clock` (wall-clock seconds) let tests script the EHR and the time.
    """

    def __init__(
        self,
        *,
        base_url: str,
        client_id: str,
        key: SmartKey,
        scopes: str = DEFAULT_SCOPES,
        token_url: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client_id or client_id != client_id.strip():
            raise ConfigError(f"SMART client_id {client_id!r} is empty or has spaces around it")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"FHIR URL {base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.key = key
        self.scopes = _check_scopes(scopes)
        self.token_url = _check_token_url(token_url, self.base_url) if token_url else None
        self.granted_scopes: str | None = None
        self.tokens_fetched = 0
        self._clock = clock
        self._token: _Token | None = None
        self._lock = threading.Lock()
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout_s,
            follow_redirects=False,
            headers={"Accept": "application/json"},
        )

    def __enter__(self) -> SmartBackendAuth:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        self._check_target(request)
        request.read()  # a 401 retry resends the request, body included
        token = self._access_token(stale=None)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            token = self._access_token(stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        raise TypeError("SmartBackendAuth is synchronous; use it with httpx.Client")
        yield request  # pragma: no cover (makes this an async generator, as httpx expects)

    def _access_token(self, stale: str | None) -> str:
        """The cached token, or a new one when it is due for renewal or the server refused it."""
        with self._lock:
            token = self._token
            if token is None or self._clock() >= token.renew_at or token.value == stale:
                token = self._token = self._request_token()
            return token.value

    def _request_token(self) -> _Token:
        token_url = self.token_url or self._discover()
        self.token_url = token_url
        now = self._clock()
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": int(now) + ASSERTION_LIFETIME_S,
            "iat": int(now),
            "jti": secrets.token_urlsafe(32),
        }
        form = {
            "grant_type": "client_credentials",
            "scope": self.scopes,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.key.sign(claims),
        }
        response = self._call("POST", token_url, "token endpoint", data=form)
        body = _json_object(response)
        if response.status_code != 200 or "error" in body:
            raise SmartAuthError(self._refusal(response.status_code, body))
        token = self._parse_token(body, now)
        self.tokens_fetched += 1
        self.granted_scopes = token.scope
        return token

    def _discover(self) -> str:
        url = f"{self.base_url}/.well-known/smart-configuration"
        response = self._call("GET", url, "SMART configuration")
        config = _json_object(response)
        where = f"FHIR server at {self.base_url}"
        if response.status_code != 200 or not config:
            answer = "not a JSON object" if response.status_code == 200 else response.status_code
            raise SmartAuthError(
                f"{where} has no SMART configuration at {url} (answered {answer}); check the "
                f"FHIR URL, or ask the EHR team whether SMART Backend Services is enabled"
            )
        token_url = config.get("token_endpoint")
        if not isinstance(token_url, str) or not token_url:
            raise SmartAuthError(
                f"{where}: its SMART configuration names no token_endpoint; the EHR's SMART "
                f"setup is incomplete, ask the EHR team for the token URL"
            )
        _check_offer(config, "token_endpoint_auth_methods_supported", "private_key_jwt", where)
        _check_offer(config, "grant_types_supported", "client_credentials", where)
        _check_offer(
            config, "token_endpoint_auth_signing_alg_values_supported", self.key.alg, where
        )
        return _check_token_url(token_url, self.base_url)

    def _call(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise SmartAuthError(
                f"the EHR's {what} at {url} did not answer in time; try again later"
            ) from exc
        except httpx.TransportError as exc:
            raise SmartAuthError(
                f"cannot reach the EHR's {what} at {url} ({type(exc).__name__}); "
                f"check the URL and the network"
            ) from exc

    def _refusal(self, status: int, body: dict[str, Any]) -> str:
        error = str(body.get("error") or f"HTTP {status}")
        detail = _redacted(str(body.get("error_description") or ""))
        said = f" (the EHR said: {detail})" if detail else ""
        who = f"client_id {self.client_id!r}"
        if error == "invalid_client":
            return (
                f"the EHR rejected this node's client assertion{said}: is the public key "
                f"(kid {self.key.kid}, {self.key.alg}) registered for {who}?"
            )
        if error == "invalid_scope":
            return (
                f"the EHR granted none of the scopes asked for ({self.scopes}){said}; ask the "
                f"EHR team to allow them for {who}, or request fewer"
            )
        if error in ("unauthorized_client", "unsupported_grant_type", "invalid_grant"):
            return (
                f"the EHR does not let {who} use the client_credentials grant ({error}){said}; "
                f"ask the EHR team to enable SMART Backend Services for it"
            )
        later = "; it is down or overloaded, try again later" if status >= 500 else ""
        return f"the EHR's token endpoint {self.token_url} refused a token: {error}{said}{later}"

    def _parse_token(self, body: dict[str, Any], now: float) -> _Token:
        value = body.get("access_token")
        token_type = body.get("token_type")
        lifetime = body.get("expires_in", ASSUMED_TOKEN_LIFETIME_S)
        if not isinstance(value, str) or not value:
            raise SmartAuthError(f"the EHR's token endpoint {self.token_url} sent no access_token")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise SmartAuthError(
                f"the EHR's token endpoint {self.token_url} issued a {token_type!r} token; "
                f"aipipe presents only bearer tokens"
            )
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise SmartAuthError(
                f"the EHR's token endpoint {self.token_url} sent expires_in={lifetime!r}, "
                f"not a positive number of seconds"
            )
        margin = min(RENEW_BEFORE_S, lifetime / 2)
        return _Token(value, now + lifetime - margin, str(body.get("scope") or ""))

    def _check_target(self, request: httpx.Request) -> None:
        """Present the token only to the FHIR server it was issued for."""
        base = urlsplit(self.base_url)
        url = request.url
        target = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme))
        if target != (base.scheme, base.hostname, base.port or _DEFAULT_PORTS.get(base.scheme)):
            raise SmartAuthError(
                f"refusing to send this node's access token for {self.base_url} to "
                f"{url.scheme}://{url.host}; it is another server"
            )


def smart_auth_for(
    base_url: str, client_id: str, key_path: Path, *, at_rest: AtRest = PLAIN
) -> SmartBackendAuth:
    """The auth a node uses for its FHIR source: its SMART key file and its client_id."""
    key = SmartKey.load(key_path, at_rest=at_rest)
    return SmartBackendAuth(base_url=base_url, client_id=client_id, key=key)


def _check_scopes(scopes: str) -> str:
    names = scopes.split()
    if not names:
        raise ConfigError("SMART scopes are empty; ask for e.g. system/Patient.rs")
    for name in names:
        match = _CLINICAL_SCOPE.match(name)
        if not match:
            continue  # not a resource scope (e.g. an EHR-specific one): the server judges it
        permissions = match.group(3)
        if permissions not in ("read", "write", "*") and not _V2_PERMISSIONS.match(permissions):
            raise ConfigError(
                f"SMART scope {name!r}: permissions must be an in-order subset of 'cruds' "
                f"(e.g. .rs) or a v1 suffix (.read, .write)"
            )
    return " ".join(names)


def _check_token_url(token_url: str, base_url: str) -> str:
    parts = urlsplit(token_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SmartAuthError(f"SMART token endpoint {token_url!r} is not an http(s) URL")
    if parts.scheme == "http" and urlsplit(base_url).scheme == "https":
        raise SmartAuthError(
            f"FHIR server at {base_url} names a plain-http token endpoint ({token_url}); "
            f"refusing to send the client assertion without TLS"
        )
    return token_url


def _check_offer(config: dict[str, Any], name: str, needed: str, where: str) -> None:
    """An advertised list that leaves out what we need; an absent list is not a refusal."""
    offered = config.get(name)
    if isinstance(offered, list) and needed not in offered:
        raise SmartAuthError(
            f"{where}: its SMART configuration lists {name} {offered}, without {needed!r} "
            f"which aipipe uses; ask the EHR team, or (for the signing algorithm) make a key "
            f"with an algorithm it lists"
        )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _redacted(text: str, limit: int = 200) -> str:
    """Server text for an error message, with anything shaped like a JWT cut out."""
    text = _JWT_LIKE.sub("[jwt]", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
