"""What the hub reads of a request before a handler runs: the token first, then a capped body.

FastAPI parses a route's JSON body before it resolves the route's dependencies, so a bearer
check in a dependency comes after the whole body is in memory. `RequestGuard` is a plain ASGI
middleware in front of every route: a request that carries a body to a route that needs a
token must present a valid one (401 otherwise, before one byte of the body is read), a
Content-Length over the route's cap is answered 413 at once, and a chunked body is counted as
it streams in and cut off with 413 at the cap. Caps are sized for what each route really takes
(docs/BENCHMARKS.md): JSON control messages are a few kilobytes, a plaintext update is 4 bytes
a parameter, a CKKS one 32.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from aipipe.errors import AuthError, error_body

KiB = 1024
MiB = 1024 * KiB
MAX_UPDATE_BYTES = 256 * MiB  # 64M float32 parameters, or 8M under CKKS (32 B a value)
MAX_KEYS_BYTES = 64 * MiB  # a CKKS key ceremony: public context + one sealed secret per node
MAX_SECAGG_BYTES = 16 * MiB  # SecAgg+ keys and shares: kilobytes per node
MAX_STUDY_BYTES = 16 * MiB  # a study spec, thousands of features with their codes
MAX_CDS_BYTES = 16 * MiB  # a CDS Hooks call with its prefetched FHIR resources
MAX_ENROL_BYTES = 64 * KiB  # an enrolment request: a name, a secret and two keys
MAX_CONTROL_BYTES = 1 * MiB  # any other JSON body (round open, decline, stats, metrics)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class BodyRule:
    """The body cap of the routes whose path matches; `token`: a bearer is checked first."""

    path: re.Pattern[str]
    cap: int
    token: bool = True


_SEGMENT = r"[^/]+"
RULES: tuple[BodyRule, ...] = (
    BodyRule(re.compile(r"/v1/enrol"), MAX_ENROL_BYTES, token=False),
    # A person's login: the password and TOTP code are the credential.
    BodyRule(re.compile(r"/v1/auth/token"), MAX_ENROL_BYTES, token=False),
    BodyRule(re.compile(r"/v1/studies"), MAX_STUDY_BYTES),
    BodyRule(re.compile(rf"/v1/studies/{_SEGMENT}/rounds/{_SEGMENT}/updates"), MAX_UPDATE_BYTES),
    BodyRule(
        re.compile(rf"/v1/studies/{_SEGMENT}/rounds/{_SEGMENT}/ckks/decrypted"), MAX_UPDATE_BYTES
    ),
    BodyRule(re.compile(rf"/v1/studies/{_SEGMENT}/ckks/keys"), MAX_KEYS_BYTES),
    BodyRule(
        re.compile(rf"/v1/studies/{_SEGMENT}/rounds/{_SEGMENT}/secagg/{_SEGMENT}"),
        MAX_SECAGG_BYTES,
    ),
    # CDS clients authenticate with their own JWT, checked by the CDS routes.
    BodyRule(re.compile(r"/cds-services(/.*)?"), MAX_CDS_BYTES, token=False),
    BodyRule(re.compile(r"/v1/.*"), MAX_CONTROL_BYTES),
)
_DEFAULT = BodyRule(re.compile(".*"), MAX_CONTROL_BYTES, token=False)


def rule_for(path: str) -> BodyRule:
    return next((r for r in RULES if r.path.fullmatch(path)), _DEFAULT)


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a streamed body passes its cap; answered 413."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"the request body is over {_size(cap)}, this route's limit")


class RequestGuard:
    """ASGI middleware: authenticate, then cap the body (see the module docstring).

    The principal it authenticated is left in the request state (`principal`), so the route's
    auth dependency does not look the token up twice.
    """

    def __init__(self, app: App, authenticate: Callable[[Scope, str | None], Any]) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        rule = rule_for(scope["path"])
        if rule.token:
            try:
                principal = self.authenticate(scope, _bearer(scope))
            except AuthError as exc:
                await _answer(scope, receive, send, exc.http_status, error_body(exc))
                return
            scope.setdefault("state", {})["principal"] = principal
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > rule.cap):
            await _answer(scope, receive, send, 413, {"detail": BodyTooLargeError(rule.cap).detail})
            return
        await self.app(scope, _capped(receive, rule.cap), send)


def _capped(receive: Receive, cap: int) -> Receive:
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise BodyTooLargeError(cap)
        return message

    return capped


async def _answer(
    scope: Scope, receive: Receive, send: Send, status: int, body: dict[str, str]
) -> None:
    """Refuse before the body is read; the connection closes, so no client keeps sending it."""
    response = JSONResponse(body, status_code=status, headers={"Connection": "close"})
    await response(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return (length is not None and length != "0") or _header(
        scope, b"transfer-encoding"
    ) is not None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1").strip()
    return None


def _bearer(scope: Scope) -> str | None:
    authorization = _header(scope, b"authorization")
    if authorization and authorization.startswith("Bearer "):
        return authorization[7:]
    return None


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
