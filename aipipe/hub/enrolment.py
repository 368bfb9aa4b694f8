"""One-time enrolment tokens: issued on the hub's machine, redeemed over HTTP by a node.

A token expires (24 h unless `--ttl` says otherwise) and enrols one name once. A name that is
already enrolled gets a token only with `replace`: re-enrolment hands the name to a new key and
revokes the old credential, so it is an explicit admin action, audited at issue and at use.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

from aipipe import clock
from aipipe.audit.log import AuditLog
from aipipe.errors import AipipeError, AuthError, ConfigError, ConflictError
from aipipe.store.hub_nodes import DEFAULT_TOKEN_TTL_S, Enrolment
from aipipe.store.hub_store import HubStore
from aipipe.wire import EnrolToken

# A DNS-label-like slug: it names the node in URLs, audit resources and file names.
NODE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
RESERVED_NAMES = frozenset({"admin", "hub", "root", "system", "unknown", "anyone", "localhost"})
MAX_TTL_S = 30 * 24 * 3600.0
_TTL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def check_node_name(name: str) -> None:
    """Refuse names that are reserved for the hub's own roles or are not a slug."""
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"node name '{name}' is reserved ({', '.join(sorted(RESERVED_NAMES))}); "
            "pick the institution's name"
        )
    if not NODE_NAME.match(name):
        raise ConfigError(
            f"node name '{name[:80]}' is not allowed: use 1-63 lower-case letters, digits and "
            "inner hyphens, e.g. 'st-olavs'"
        )


def parse_ttl(text: str) -> float:
    """'90', '90s', '30m', '24h' or '7d' as seconds, between 1 s and 30 days."""
    match = _TTL.match(text.strip().lower())
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)] if match else 0.0
    if not 1 <= seconds <= MAX_TTL_S:
        raise ConfigError(
            f"--ttl {text!r} is not a lifetime between 1s and 30d; write e.g. 3600, 30m, 24h or 7d"
        )
    return seconds


def issue_token(
    store: HubStore,
    audit: AuditLog,
    node: str,
    hub_url: str,
    *,
    ttl_s: float = DEFAULT_TOKEN_TTL_S,
    replace: bool = False,
    ca_der: bytes | None = None,
) -> str:
    """A token carrying the hub URL, a secret and the CA the node is to pin (`ca_der`, the
    consortium CA's certificate, with its SHA-256); only the secret's hash is kept at the hub."""
    check_node_name(node)
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ConfigError(f"a token lifetime must be within 30 days, not {ttl_s:g} s")
    enrolled = store.is_enrolled(node)
    if enrolled and not replace:
        raise ConflictError(
            f"node '{node}' is already enrolled; a new token would replace its key and revoke "
            f"its credential. If that is meant: aipipe hub enrol-token --node {node} --replace"
        )
    expires_at = clock.plus(clock.utc_now(), ttl_s)
    pin = {} if ca_der is None else {
        "ca_sha256": hashlib.sha256(ca_der).hexdigest(),
        "ca_cert": base64.b64encode(ca_der).decode(),
    }  # fmt: skip
    token = EnrolToken(hub_url=hub_url, node=node, secret=secrets.token_urlsafe(32), **pin)
    store.add_enrol_token(node, token.secret, expires_at=expires_at, replaces=replace)
    audit.append(
        "admin",
        actor="admin",
        resource=f"node/{node}",
        details={
            "op": "enrol-token",
            "expires_at": expires_at,
            "replace": replace,
            "enrolled": enrolled,
            "ca_sha256": pin.get("ca_sha256"),
        },
    )
    return token.encode()


def refusal(node: str, done: Enrolment) -> tuple[str, AipipeError]:
    """Why a token was not honoured (for the audit) and the error its redeemer gets."""
    again = f"ask the hub's admin for a new one: aipipe hub enrol-token --node {node}"
    if done.status == "expired":
        error: AipipeError = AuthError(
            f"enrolment token for '{node}' expired at {done.expires_at}; {again}"
        )
        return "expired token", error
    if done.status == "taken":
        error = ConflictError(
            f"node '{node}' is already enrolled with another key; to move the name to this node "
            f"the hub's admin must issue: aipipe hub enrol-token --node {node} --replace"
        )
        return "name already enrolled", error
    return "invalid or used token", AuthError(
        f"enrolment token for '{node}' is invalid or already used"
    )


def token_expiry(store: HubStore, node: str) -> str | None:
    """When the node's outstanding token expires (for the CLI to say)."""
    row = store.conn.execute(
        "SELECT expires_at FROM enrol_tokens WHERE node = ?", (node,)
    ).fetchone()
    return None if row is None else row[0]
