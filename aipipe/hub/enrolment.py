"""One-time enrolment tokens: issued on the hub's machine, redeemed over HTTP by a node."""

from __future__ import annotations

import secrets

from aipipe.audit.log import AuditLog
from aipipe.store.hub_store import HubStore
from aipipe.wire import EnrolToken


def issue_token(store: HubStore, audit: AuditLog, node: str, hub_url: str) -> str:
    """A token carrying the hub URL and a secret; only its hash is kept at the hub."""
    token = EnrolToken(hub_url=hub_url, node=node, secret=secrets.token_urlsafe(32))
    store.add_enrol_token(node, token.secret)
    audit.append("admin", actor="admin", resource=f"node/{node}", details={"op": "enrol-token"})
    return token.encode()
