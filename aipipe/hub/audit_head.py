"""Every hub response carries the hub's latest signed audit head (``X-Aipipe-Audit-Head``).

Nodes keep the highest head they have seen (`aipipe.audit.HeadRecorder`), so a hub log that is
later truncated, wiped or replaced fails ``aipipe audit verify --anchor`` with a node's copy.
The head is the checkpoint the hub's `AuditLog` last signed, cached: nothing is signed per
request. A pure ASGI middleware, so that it never buffers or reads a request or response body.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aipipe.audit.anchor import HEADER, Anchor
from aipipe.audit.log import AuditLog


class AuditHeadMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_head(message: Message) -> None:
            if message["type"] == "http.response.start":
                head = _signed_head(scope)
                if head is not None:
                    MutableHeaders(scope=message).append(HEADER, head)
            await send(message)

        await self.app(scope, receive, send_with_head)


def _signed_head(scope: Scope) -> str | None:
    state = getattr(scope.get("app"), "state", None)
    audit = getattr(state, "audit", None)
    if not isinstance(audit, AuditLog) or audit.latest_checkpoint is None:
        return None
    return Anchor.from_checkpoint(audit.latest_checkpoint).compact()
