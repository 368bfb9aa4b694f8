"""Studies, their rounds, the updates and declines nodes send, and the work long-poll."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request

from aipipe.hub.limits import MAX_UPDATE_BYTES
from aipipe.hub.routes.deps import LONG_POLL_STEP_S, Node, Notify, Number, Reader, Steer, Svc
from aipipe.wire import (
    Decline,
    FeatureStats,
    RoundInfo,
    RoundOpen,
    StudyInfo,
    StudyPublish,
    UpdateReceipt,
    WorkItem,
)
from aipipe.wire.frames import MEDIA_TYPE

router = APIRouter()


@router.post("/v1/studies")
async def publish(body: StudyPublish, service: Svc, who: Steer) -> StudyInfo:
    return service.publish(body.spec, actor=f"{who.kind}/{who.name}")


@router.get("/v1/studies/{study}")
async def study(study: str, service: Svc, who: Reader) -> StudyInfo:
    return service.access.study(who, study)


@router.post("/v1/studies/{study}/rounds")
async def open_round(
    study: str, body: RoundOpen, service: Svc, changes: Notify, who: Steer
) -> RoundInfo:
    info = service.open_round(study, body.deadline_s, actor=f"{who.kind}/{who.name}")
    changes.notify()
    return info


@router.get("/v1/studies/{study}/rounds")
async def rounds(study: str, service: Svc, who: Reader) -> list[RoundInfo]:
    service.spec(study)  # 404 for a study that does not exist, not []
    return service.access.rounds(who, study)


@router.get("/v1/studies/{study}/rounds/{number}")
async def round_info(
    study: str,
    number: Number,
    service: Svc,
    changes: Notify,
    who: Reader,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
    state: str | None = None,
    metrics: int | None = None,
) -> RoundInfo:
    """With `wait`, answer once the round's state differs from `state` or its number of
    metric reports from `metrics` (a long-poll for `train round --wait`)."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        info = service.access.round(who, study, number)
        left = deadline - asyncio.get_running_loop().time()
        unchanged = info.state == state and len(info.metrics) == (metrics or 0)
        if left <= 0 or not unchanged or state is None:
            return info
        await changes.wait(min(left, LONG_POLL_STEP_S))


@router.post("/v1/studies/{study}/rounds/{number}/updates")
async def upload(
    study: str, number: Number, request: Request, service: Svc, changes: Notify, node: Node
) -> UpdateReceipt:
    if request.headers.get("content-type") != MEDIA_TYPE:
        service.refuse_update(node.name, study, number, f"updates are sent as {MEDIA_TYPE}")
    body = await request.body()
    if len(body) > MAX_UPDATE_BYTES:
        service.refuse_update(node.name, study, number, f"update of {len(body)} bytes is too large")
    receipt = service.receive_update(node.name, study, number, body)
    changes.notify()
    return receipt


@router.post("/v1/studies/{study}/rounds/{number}/decline")
async def decline(
    study: str, number: Number, body: Decline, service: Svc, changes: Notify, node: Node
) -> dict[str, bool]:
    service.decline(node.name, study, number, body.reason, body.exclude)
    changes.notify()
    return {"ok": True}


@router.post("/v1/studies/{study}/stats")
async def stats(study: str, body: FeatureStats, service: Svc, node: Node) -> dict[str, bool]:
    service.report_stats(node.name, study, body)
    return {"ok": True}


@router.get("/v1/work")
async def work(
    service: Svc,
    changes: Notify,
    node: Node,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
    skip: Annotated[list[str] | None, Query(max_length=64)] = None,
) -> WorkItem:
    deadline = asyncio.get_running_loop().time() + wait
    declined = frozenset(skip or ())  # studies the node has not approved (yet)
    while True:
        item = service.work_for(node.name, declined)
        left = deadline - asyncio.get_running_loop().time()
        if item.kind != "idle" or left <= 0:
            return item
        await changes.wait(min(left, LONG_POLL_STEP_S))
