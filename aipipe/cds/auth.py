"""Authenticating CDS Clients: the signed JWT of CDS Hooks 2.0 ("Trusting CDS Clients").

Every call carries `Authorization: Bearer <JWT>`, signed with the client's private key. The
policy accepts only allow-listed issuers, with their JWK Sets given inline (`jku` is never
fetched: a URL in the token cannot choose the key that verifies it), asymmetric algorithms
(ES384 and RS384 by default, as the spec recommends; never `none` or HMAC), `aud` equal to the URL
of the endpoint called, a valid `exp` no further ahead than `max_lifetime_s`, and a `jti` not seen
before. The replay cache is per process: several service replicas need a shared `JtiStore` (an
insert into a table keyed by (iss, jti) in PostgreSQL, or Redis `SET NX EX`), or a token replayed
against another replica within its lifetime would be accepted there.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from aipipe.errors import AuthError

_ASYMMETRIC = {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
_KEY_TYPE = {"E": "EC", "R": "RSA", "P": "RSA"}


class JtiStore(Protocol):
    def claim(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record (issuer, jti) until `expires_at`; False if it was already recorded."""
        ...


class MemoryJtiStore:
    """In-process replay cache; entries leave once their token has expired."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, str, str]] = []

    def claim(self, issuer: str, jti: str, expires_at: float) -> bool:
        now = self._clock()
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                _, old_issuer, old_jti = heapq.heappop(self._expiry)
                self._seen.discard((old_issuer, old_jti))
            if (issuer, jti) in self._seen:
                return False
            self._seen.add((issuer, jti))
            heapq.heappush(self._expiry, (expires_at, issuer, jti))
            return True

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class CdsClient:
    """A verified caller."""

    issuer: str
    jti: str
    tenant: str | None = None

    @property
    def actor(self) -> str:
        return f"cds-client:{self.issuer}"


@dataclass(frozen=True)
class _Key:
    key: Any
    kty: str
    alg: str | None


class JwtPolicy:
    """Which CDS Clients may call, and how their JWTs are checked.

    `issuers` maps each allowed `iss` to its JWK Set (`{"keys": [...]}`, public keys with `kid`).
    `base_url` is the service's public `{baseUrl}` (what clients put in `aud`); without it the
    URL of the request as received is the expected audience.
    """

    def __init__(
        self,
        issuers: Mapping[str, Mapping[str, Any]],
        *,
        base_url: str | None = None,
        algorithms: Iterable[str] = ("ES384", "RS384"),
        leeway_s: float = 30.0,
        max_lifetime_s: float = 300.0,
        replay: JtiStore | None = None,
    ) -> None:
        self._algorithms = frozenset(algorithms)
        unsafe = sorted(self._algorithms - _ASYMMETRIC)
        if unsafe or not self._algorithms:
            raise ValueError(
                f"JWT algorithms {unsafe or '(none)'} are not allowed: CDS Hooks forbids 'none' "
                "and symmetric (HMAC) signatures; use ES384 or RS384"
            )
        if not issuers:
            raise ValueError("a JwtPolicy needs at least one allowed issuer with its JWK Set")
        self._keys = {iss: _load_jwks(iss, jwks) for iss, jwks in issuers.items()}
        self.base_url = base_url.rstrip("/") if base_url else None
        self._leeway = leeway_s
        self._max_lifetime = max_lifetime_s
        self._replay: JtiStore = replay if replay is not None else MemoryJtiStore()

    def audience(self, request_url: str, endpoint: str) -> str:
        """The `aud` a call must carry: `{baseUrl}{endpoint}` (endpoint like `/cds-services/x`)."""
        if self.base_url is not None:
            return self.base_url + endpoint
        return request_url.split("?", 1)[0]

    def verify(self, authorization: str | None, audience: str) -> CdsClient:
        """Check the `Authorization` header value; raise `AuthError` saying what is wrong."""
        token = _bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a JWT") from None
        issuer = unverified.get("iss")
        key = self._key(header, issuer)
        alg = str(header["alg"])
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                leeway=self._leeway,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"the JWT's aud does not name this endpoint ({audience})") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"the JWT was rejected: {exc}") from None
        return self._claim(claims)

    def _key(self, header: Mapping[str, Any], issuer: Any) -> _Key:
        alg = header.get("alg")
        if alg not in self._algorithms:
            allowed = ", ".join(sorted(self._algorithms))
            raise AuthError(f"JWT alg {alg!r} is not accepted; sign with {allowed}")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.upper() != "JWT":
            raise AuthError("the JWT header must carry typ 'JWT'")
        keys = self._keys.get(issuer) if isinstance(issuer, str) else None
        if keys is None:
            raise AuthError("the JWT's iss is not an allowed CDS Client")
        kid = header.get("kid")
        key = keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError(f"no key with kid {kid!r} is registered for this CDS Client")
        if key.kty != _KEY_TYPE[str(alg)[0]] or (key.alg is not None and key.alg != alg):
            raise AuthError(f"key {kid!r} cannot verify a JWT signed with {alg}")
        return key

    def _claim(self, claims: Mapping[str, Any]) -> CdsClient:
        exp, jti = float(claims["exp"]), claims["jti"]
        if exp - time.time() > self._max_lifetime + self._leeway:
            raise AuthError(
                f"the JWT expires more than {self._max_lifetime:.0f} s ahead; issue short-lived "
                "tokens (one per call)"
            )
        if not isinstance(jti, str) or not jti:
            raise AuthError("the JWT's jti must be a non-empty string")
        if not self._replay.claim(str(claims["iss"]), jti, exp + self._leeway):
            raise AuthError("the JWT's jti was used before (replayed token)")
        tenant = claims.get("tenant")
        return CdsClient(str(claims["iss"]), jti, tenant if isinstance(tenant, str) else None)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("this CDS service needs an 'Authorization: Bearer <JWT>' header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()


def _load_jwks(issuer: str, jwks: Mapping[str, Any]) -> dict[str, _Key]:
    entries = jwks.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"the JWK Set of issuer {issuer!r} has no keys")
    keys: dict[str, _Key] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            raise ValueError(f"every key of issuer {issuer!r} needs a kid")
        if "d" in entry:
            raise ValueError(
                f"key {entry['kid']!r} of issuer {issuer!r} is a private key; give the public JWK"
            )
        try:
            parsed = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ValueError(f"key {entry['kid']!r} of issuer {issuer!r}: {exc}") from exc
        alg = entry.get("alg")
        keys[entry["kid"]] = _Key(
            parsed.key, str(entry.get("kty")), alg if isinstance(alg, str) else None
        )
    return keys
