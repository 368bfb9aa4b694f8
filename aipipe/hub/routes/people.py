"""People and API tokens (`aipipe.hub.people`): a person's login for a token (public: the
password and TOTP code are the credential), and the admin's management of people and tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from aipipe.hub.principal import Principal
from aipipe.hub.routes.deps import Admin, Svc
from aipipe.wire.messages import ErrorBody
from aipipe.wire.people import (
    PersonAdd,
    PersonCreated,
    PersonInfo,
    ServiceTokenIssue,
    TokenGrant,
    TokenInfo,
    TokenRequest,
)

router = APIRouter()


def _actor(who: Principal) -> str:
    return f"{who.kind}/{who.name}"


THROTTLED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "Too many failed logins from this address "
        "(ThrottledError); the Retry-After header says when to try again",
    }
}


@router.post("/v1/auth/token", responses=THROTTLED)
async def login(body: TokenRequest, request: Request, service: Svc) -> TokenGrant:
    """A token for a person: their password and current TOTP code (each code works once).
    An address with too many failed logins is refused (429) before its password is checked."""
    address = request.client.host if request.client else "unknown"
    return await service.people.login(body, address)


@router.get("/v1/people")
async def people(service: Svc, _: Admin) -> list[PersonInfo]:
    return service.people.people()


@router.post("/v1/people")
async def add_person(body: PersonAdd, service: Svc, who: Admin) -> PersonCreated:
    """A new person: their one-time password and TOTP provisioning URI, shown once."""
    return service.people.add(body.name, body.role, _actor(who))


@router.post("/v1/people/{name}/disable")
async def disable_person(name: str, service: Svc, who: Admin) -> PersonInfo:
    return service.people.disable(name, _actor(who))


@router.post("/v1/people/{name}/unlock")
async def unlock_person(name: str, service: Svc, who: Admin) -> PersonInfo:
    return service.people.unlock(name, _actor(who))


@router.get("/v1/tokens")
async def tokens(service: Svc, _: Admin) -> list[TokenInfo]:
    """Every API token (ids, roles, expiry, use; never a token nor its hash)."""
    return service.people.tokens()


@router.post("/v1/tokens")
async def issue_token(body: ServiceTokenIssue, service: Svc, who: Admin) -> TokenGrant:
    """A service token (e.g. Prometheus with `auditor`), shown once."""
    return service.people.issue(body, _actor(who))


@router.delete("/v1/tokens/{token_id}")
async def revoke_token(token_id: str, service: Svc, who: Admin) -> TokenInfo:
    return service.people.revoke(token_id, _actor(who))
