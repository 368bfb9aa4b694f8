"""Messages of the hub's people and API tokens (`aipipe.hub.people`): a person's login for a
token, the token granted once, and the admin's views of people and tokens (never a hash)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aipipe.wire.messages import Wire

HumanRole = Literal["admin", "scientist", "auditor"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
DEFAULT_LIFETIME_S = 8 * 3600.0
MAX_LIFETIME_S = 12 * 3600.0


class TokenRequest(Wire):
    """`POST /v1/auth/token`: a person's password and current TOTP code for a token of their
    role, or of a lesser one (`role`), living `lifetime_s` (8 h by default, 12 h at most)."""

    person: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    totp: str = Field(max_length=16)
    role: HumanRole | None = None
    lifetime_s: float = Field(default=DEFAULT_LIFETIME_S, gt=0, le=MAX_LIFETIME_S)


class TokenGrant(Wire):
    """A token, shown once: the hub keeps only its sha256."""

    id: str
    token: str
    role: HumanRole
    name: str
    expires_at: str | None


class PersonAdd(Wire):
    name: str = Field(pattern=_NAME)
    role: HumanRole


class PersonCreated(Wire):
    """A new person's one-time password and TOTP provisioning URI (for an authenticator app),
    shown once."""

    name: str
    role: HumanRole
    password: str
    totp_uri: str


class PersonInfo(Wire):
    name: str
    role: HumanRole
    created_at: str
    disabled_at: str | None
    locked_at: str | None


class ServiceTokenIssue(Wire):
    """A service token (a Prometheus scraper, a pipeline): a name, a role, and how long it
    lives (None: until revoked)."""

    name: str = Field(pattern=_NAME)
    role: HumanRole
    expires_in_s: float | None = Field(default=None, gt=0, le=400 * 24 * 3600.0)


class TokenInfo(Wire):
    id: str
    name: str
    person: str | None
    role: HumanRole
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used: str | None
