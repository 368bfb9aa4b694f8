"""Who may call which hub route: the roles, and the `Allow` dependency every route declares.

Roles (DESIGN §6, issue 15):

- ``admin``: runs the consortium: enrols and revokes nodes, manages people and their tokens,
  and everything a scientist or an auditor may do;
- ``scientist``: publishes studies, opens and follows rounds, reads models and their weights;
- ``auditor`` (data steward or ethics board): reads the audit status, privacy spent, nodes,
  studies, rounds and models, never weights;
- ``node``: an enrolled institution's daemon, scoped further by `aipipe.hub.access.Access` to
  the studies it takes part in.

A route's roles are declared once, in its signature (`Allow(...)` as a dependency), so the
route × role table (`route_roles`, printed in the README) is read from the code itself. A
route without an `Allow` is public (health, enrolment by one-time token, a person's login
with password and TOTP code, CDS Hooks with its own JWT). Who holds which token: people and
service tokens in `aipipe.hub.people`, node credentials at enrolment. A refusal raises
`ForbiddenError` (403) and is audited as ``auth.refused``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, get_args

from fastapi import APIRouter, Depends, Header, Request
from fastapi.routing import APIRoute

from aipipe.errors import ForbiddenError
from aipipe.hub import mtls
from aipipe.hub.principal import Principal, Role

ROLES: tuple[Role, ...] = get_args(Role)
HUMAN_ROLES: tuple[Role, ...] = ("admin", "scientist", "auditor")
PUBLIC = "public"


def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """Who is asking: `RequestGuard` authenticated a request with a body before reading it;
    any other request is authenticated here (with the node certificate binding of mutual TLS,
    `aipipe.hub.mtls`)."""
    checked: Principal | None = getattr(request.state, "principal", None)
    if checked is not None:
        return checked
    token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
    return mtls.authenticate(request.scope, token)


class Allow:
    """A FastAPI dependency: the caller must hold one of `roles` (403 and audited otherwise)."""

    def __init__(self, *roles: Role) -> None:
        unknown = set(roles) - set(ROLES)
        if not roles or unknown:
            raise ValueError(f"Allow needs roles among {ROLES}, got {roles}")
        self.roles = frozenset(roles)

    def __call__(
        self, request: Request, who: Annotated[Principal, Depends(principal)]
    ) -> Principal:
        if who.kind not in self.roles:
            reason = (
                f"{who.kind} '{who.name}' may not {request.method} {request.url.path}: it "
                f"needs the role {' or '.join(sorted(self.roles))}"
            )
            request.app.state.service.audit_refusal(who, request.method, request.url.path, reason)
            raise ForbiddenError(reason)
        return who


@dataclass(frozen=True)
class RouteRoles:
    method: str
    path: str
    roles: frozenset[Role] | None  # None: public (no hub token asked)


def route_roles(routers: Iterable[APIRouter]) -> list[RouteRoles]:
    """Every route of `routers` with the roles its `Allow` names, read from its dependencies."""
    rows = []
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute):
            continue
        allowed = _allowed(route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            rows.append(RouteRoles(method, route.path, allowed))
    return sorted(rows, key=lambda r: (r.path, r.method))


def _allowed(route: APIRoute) -> frozenset[Role] | None:
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if isinstance(dependency.call, Allow):
            return dependency.call.roles
        pending.extend(dependency.dependencies)
    return None


def markdown_table(rows: list[RouteRoles]) -> str:
    """The README's route × role table: ✓ allowed, · refused (403), public for everyone."""
    header = "| route | " + " | ".join(ROLES) + " |"
    lines = [header, "|---|" + "---|" * len(ROLES)]
    for row in rows:
        cells = [
            PUBLIC if row.roles is None else ("✓" if role in row.roles else "·") for role in ROLES
        ]
        lines.append(f"| `{row.method} {row.path}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
