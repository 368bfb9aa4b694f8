"""People and role-scoped API tokens at the hub (DESIGN §6, issue 15); every decision audited.

- A person has one human role (admin, scientist or auditor), a scrypt password hash and a TOTP
  secret. They get a token with `login` (`POST /v1/auth/token`, `aipipe login`): password and
  current TOTP code, for their own role or a lesser one (`GRANTABLE`: an admin may take a
  scientist or auditor token; a scientist or an auditor only their own), living 8 h by default
  and 12 h at most. A code works once (its time step is spent). An unknown person, a wrong
  password, a wrong or replayed code, a locked or a disabled person all get the same 401 and
  message (`LOGIN_REFUSED`), each audited ``auth.failure`` with its reason; `LOCK_AFTER`
  failures in a row lock the person until an admin unlocks them. One address failing too often
  is refused before any password is checked, and the check itself runs off the event loop
  (`aipipe.hub.login_guard`).
- A service token (a Prometheus scraper with ``auditor``, a pipeline with ``scientist``) is
  issued by an admin with a name, a role and an optional expiry.
- A token's role is its scope. The hub keeps its sha256 only; an expired or revoked token, or
  one of a disabled person, is refused (401, audited ``auth.failure`` with the reason, never
  the token). `hub init`'s admin token is an ordinary admin token named ``bootstrap``.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NoReturn, cast

import anyio
import anyio.to_thread

from aipipe import clock
from aipipe.audit.log import AuditLog
from aipipe.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ThrottledError,
)
from aipipe.hub.login_guard import CONCURRENT, LoginGuard
from aipipe.hub.passwords import (
    hash_password,
    new_password,
    new_totp_secret,
    totp_step,
    totp_uri,
    verify_password,
)
from aipipe.hub.principal import Principal, Role
from aipipe.store.hub_nodes import secret_hash
from aipipe.store.hub_store import HubStore
from aipipe.wire.people import (
    HumanRole,
    PersonCreated,
    PersonInfo,
    ServiceTokenIssue,
    TokenGrant,
    TokenInfo,
    TokenRequest,
)

GRANTABLE: dict[str, tuple[HumanRole, ...]] = {
    "admin": ("admin", "scientist", "auditor"),
    "scientist": ("scientist",),
    "auditor": ("auditor",),
}
LOCK_AFTER = 5
LOGIN_REFUSED = (
    "login refused: unknown person, wrong password or TOTP code, or the account is locked or "
    "disabled; check them and try again with a new code, or ask an admin"
)
THROTTLED = (
    "too many failed logins from this address: wait for the time Retry-After gives, then try "
    "again with a new code"
)
LOGIN_ROUTE = "POST /v1/auth/token"
TOUCH_EVERY = timedelta(seconds=60)  # a token's last_used is written at most once a minute


def new_token(role: str) -> str:
    """A bearer token: its role in the prefix (for humans reading a config), 256 random bits."""
    return f"aipipe-{role}." + secrets.token_urlsafe(32)


class People:
    """The hub's people and API tokens over its store and audit log (`HubService.people`, and
    `Hub.people` for the operator's commands on the hub machine)."""

    def __init__(
        self,
        store: HubStore,
        audit: AuditLog,
        issuer: str,
        now: Callable[[], datetime] = clock.now,
    ) -> None:
        self.store = store
        self.audit = audit
        self.issuer = issuer
        self._now = now
        self.guard = LoginGuard()
        self._checks: anyio.CapacityLimiter | None = None

    # -- bearer tokens -----------------------------------------------------------------------

    def authenticate(self, bearer: str) -> Principal | None:
        """The principal an API token stands for; None if it is no API token (a node's
        credential, maybe); AuthError, audited, for an expired, revoked or disabled one."""
        row = self.store.api_token(secret_hash(bearer))
        if row is None:
            return None
        now = self._now()
        problem = self._token_problem(row, now)
        if problem is not None:
            reason, message = problem
            self.audit.append(
                "auth.failure",
                actor=f"token/{row['id']}",
                outcome="refused",
                details={"reason": reason},
            )
            raise AuthError(message)
        self.store.touch_api_token(row["id"], clock.iso(now), clock.iso(now - TOUCH_EVERY))
        return Principal(cast(Role, row["role"]), str(row["person"] or row["name"]))

    def _token_problem(self, token: sqlite3.Row, now: datetime) -> tuple[str, str] | None:
        ident = token["id"]
        if token["revoked_at"] is not None:
            return "revoked", f"token {ident} was revoked at {token['revoked_at']}; get a new one"
        expires = token["expires_at"]
        if expires is not None and clock.parse_instant(expires) <= now:
            return "expired", f"token {ident} expired at {expires}; get a new one (aipipe login)"
        if token["person"] is not None:
            person = self.store.person(token["person"])
            if person is None or person["disabled_at"] is not None:
                return "disabled", f"token {ident} belongs to a disabled person; ask an admin"
        return None

    # -- login -------------------------------------------------------------------------------

    async def login(self, request: TokenRequest, address: str) -> TokenGrant:
        """A token for a person who gave their password and a fresh TOTP code (see module),
        asked from client `address`, which `aipipe.hub.login_guard` may refuse first."""
        now = self._now()
        throttle = self.guard.admit(address, now)
        if throttle is not None:
            if throttle.audit is not None:
                self.audit.append("auth.throttled", actor=f"address/{address}",
                                  resource=LOGIN_ROUTE, outcome="refused",
                                  details=throttle.audit)  # fmt: skip
            raise ThrottledError(THROTTLED, retry_after_s=throttle.retry_after_s)
        failed = True
        try:
            grant = await self._login(request)
            failed = False
            return grant
        except ForbiddenError:  # the right password and code: no guess
            failed = False
            raise
        finally:
            self.guard.done(address, self._now(), failed=failed)

    async def _login(self, request: TokenRequest) -> TokenGrant:
        row = self.store.person(request.person)
        stored = row["password_hash"] if row else None
        if self._checks is None:  # made on the event loop that serves the hub
            self._checks = anyio.CapacityLimiter(CONCURRENT)
        password_ok = await anyio.to_thread.run_sync(
            verify_password, request.password, stored, limiter=self._checks
        )
        if row is None:
            self._refuse_login(None, "unknown-person")
        name = str(row["name"])
        if row["disabled_at"] is not None:
            self._refuse_login(name, "disabled")
        if row["locked_at"] is not None:
            self._refuse_login(name, "locked")
        if not password_ok:
            self._refuse_login(name, "password", count=True)
        now = self._now()
        step = totp_step(self.store.totp_secret(row), request.totp, now)
        if step is None:
            self._refuse_login(name, "totp", count=True)
        role = request.role or cast(HumanRole, row["role"])
        if role not in GRANTABLE[row["role"]]:
            reason = f"person '{name}' ({row['role']}) may not hold a {role} token"
            self.audit.append("auth.refused", actor=f"person/{name}", resource=LOGIN_ROUTE,
                              outcome="refused", details={"reason": reason})  # fmt: skip
            raise ForbiddenError(f"{reason}: ask for one of {', '.join(GRANTABLE[row['role']])}")
        if not self.store.login_succeeded(name, step):
            self._refuse_login(name, "totp-replayed", count=True)
        expires = clock.iso(now + timedelta(seconds=request.lifetime_s))
        return self._grant(role, name, name, expires, actor=f"person/{name}", op="login")

    def _refuse_login(self, name: str | None, reason: str, *, count: bool = False) -> NoReturn:
        """Audit a refused login (an unknown name is not recorded: it may be a mistyped
        password) and raise the one message every refusal shares."""
        locked = count and name is not None and self.store.login_failed(name, LOCK_AFTER)
        actor = "unknown" if name is None else f"person/{name}"
        self.audit.append("auth.failure", actor=actor, resource=LOGIN_ROUTE,
                          outcome="refused", details={"reason": reason})  # fmt: skip
        if locked:
            self.audit.append("person.locked", actor=actor, resource=actor, outcome="refused",
                              details={"failures": LOCK_AFTER})  # fmt: skip
        raise AuthError(LOGIN_REFUSED)

    # -- administration ----------------------------------------------------------------------

    def add(self, name: str, role: HumanRole, actor: str) -> PersonCreated:
        """A new person with a one-time password and a TOTP secret (both shown once)."""
        password, secret = new_password(), new_totp_secret()
        if not self.store.add_person(name, role, hash_password(password), secret):
            raise ConflictError(f"a person named '{name}' exists; pick another name")
        self.audit.append("person.added", actor=actor, resource=f"person/{name}",
                          details={"role": role})  # fmt: skip
        uri = totp_uri(secret, name, self.issuer)
        return PersonCreated(name=name, role=role, password=password, totp_uri=uri)

    def people(self) -> list[PersonInfo]:
        keys = ("name", "role", "created_at", "disabled_at", "locked_at")
        return [PersonInfo(**{k: row[k] for k in keys}) for row in self.store.people()]

    def disable(self, name: str, actor: str) -> PersonInfo:
        """No more logins, and every token of theirs refused from the next request on."""
        return self._change(name, self.store.disable_person, "person.disabled", actor)

    def unlock(self, name: str, actor: str) -> PersonInfo:
        return self._change(name, self.store.unlock_person, "person.unlocked", actor)

    def _change(
        self, name: str, change: Callable[[str], bool], action: str, actor: str
    ) -> PersonInfo:
        if not change(name):
            raise NotFoundError(f"no person named '{name}' at this hub; list them: hub user list")
        self.audit.append(action, actor=actor, resource=f"person/{name}")
        return next(p for p in self.people() if p.name == name)

    def issue(self, request: ServiceTokenIssue, actor: str) -> TokenGrant:
        """A service token (no person), e.g. for Prometheus with the auditor role."""
        expires = None
        if request.expires_in_s is not None:
            expires = clock.iso(self._now() + timedelta(seconds=request.expires_in_s))
        return self._grant(request.role, request.name, None, expires, actor=actor, op="issue")

    def tokens(self) -> list[TokenInfo]:
        keys = TokenInfo.model_fields
        return [TokenInfo(**{k: row[k] for k in keys}) for row in self.store.api_tokens()]

    def revoke(self, token_id: str, actor: str) -> TokenInfo:
        """Revoke a token: refused from the next request on."""
        if not self.store.revoke_api_token(token_id):
            raise NotFoundError(f"no token with id '{token_id}'; list them: hub token list")
        self.audit.append("token.revoked", actor=actor, resource=f"token/{token_id}")
        return next(t for t in self.tokens() if t.id == token_id)

    def _grant(
        self, role: HumanRole, name: str, person: str | None, expires: str | None, *,
        actor: str, op: str,
    ) -> TokenGrant:  # fmt: skip
        token = new_token(role)
        token_id = self.store.add_api_token(
            secret_hash(token), role=role, name=name, person=person, expires_at=expires
        )
        self.audit.append("token.issued", actor=actor, resource=f"token/{token_id}",
                          details={"op": op, "role": role, "name": name,
                                   "expires_at": expires})  # fmt: skip
        return TokenGrant(id=token_id, token=token, role=role, name=name, expires_at=expires)
