"""What the hub's routes share: the service and the long-poll wake-ups on the app's state, who
is asking (`RequestGuard` authenticated the token before the body was read), and the path and
body limits."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from aipipe.errors import ConflictError
from aipipe.hub.limits import MAX_KEYS_BYTES
from aipipe.hub.principal import Principal
from aipipe.hub.roles import Allow
from aipipe.hub.service import HubService

MAX_ROUND = 2**31 - 1  # path integers past this are refused (422), not overflowed (500)
LONG_POLL_STEP_S = 0.2


class Changes:
    """Wakes long-polls when this process changes round state.

    Only a wake-up: waiters re-read the store and still poll it every LONG_POLL_STEP_S, so a
    change made by another hub replica is seen too, just later.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


def _changes(request: Request) -> Changes:
    changes: Changes = request.app.state.changes
    return changes


def _service(request: Request) -> HubService:
    service: HubService = request.app.state.service
    return service


Svc = Annotated[HubService, Depends(_service)]
Notify = Annotated[Changes, Depends(_changes)]
Admin = Annotated[Principal, Depends(Allow("admin"))]
Steer = Annotated[Principal, Depends(Allow("admin", "scientist"))]  # publish, open rounds
Reader = Annotated[Principal, Depends(Allow("admin", "scientist", "auditor", "node"))]
Weights = Annotated[Principal, Depends(Allow("admin", "scientist", "node"))]
Overseer = Annotated[Principal, Depends(Allow("admin", "scientist", "auditor"))]
Monitor = Annotated[Principal, Depends(Allow("admin", "auditor"))]  # Prometheus scrapes
Node = Annotated[Principal, Depends(Allow("node"))]
Keys = Annotated[Principal, Depends(Allow("admin", "node"))]
Number = Annotated[int, Path(ge=1, le=MAX_ROUND, description="round number")]


def binary(media_type: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 200 that is not JSON."""
    schema = {"type": "string", "format": "binary"} if media_type != "text/plain" else {}
    return {200: {"content": {media_type: {"schema": schema or {"type": "string"}}}}}


async def small_body(request: Request) -> bytes:
    """A JSON body of key material: keys, shares, sealed contexts (well under 64 MiB)."""
    body = await request.body()
    if len(body) > MAX_KEYS_BYTES:
        raise ConflictError(f"request body of {len(body)} bytes is too large for key material")
    return body
