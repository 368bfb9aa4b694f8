"""SecAgg+ stages and the CKKS key ceremony (DESIGN §7); see `aipipe.hub.secure`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from aipipe.errors import ConflictError
from aipipe.hub.limits import MAX_UPDATE_BYTES
from aipipe.hub.routes.deps import (
    LONG_POLL_STEP_S,
    Keys,
    Node,
    Notify,
    Number,
    Svc,
    binary,
    small_body,
)
from aipipe.wire.frames import MEDIA_TYPE
from aipipe.wire.secure import CkksKeyInfo, Keyring, SecAggRoundConfig

router = APIRouter()
ROUND = "/v1/studies/{study}/rounds/{number}"


@router.get("/v1/keyring")
async def keyring(service: Svc, _: Keys) -> Keyring:
    return service.secure.keyring()


@router.get(ROUND + "/secagg/config")
async def secagg_config(study: str, number: Number, service: Svc, node: Node) -> SecAggRoundConfig:
    return service.secure.secagg.config(service.spec(study), number, node.name)


@router.post(ROUND + "/secagg/{step}")
async def secagg_post(
    study: str,
    number: Number,
    step: str,
    request: Request,
    service: Svc,
    changes: Notify,
    node: Node,
) -> dict[str, bool]:
    service.secure.secagg.post(
        service.spec(study), number, node.name, step, await small_body(request)
    )
    changes.notify()
    return {"ok": True}


@router.get(ROUND + "/secagg/{step}", responses={204: {"description": "not ready yet"}})
async def secagg_poll(
    study: str,
    number: Number,
    step: str,
    service: Svc,
    changes: Notify,
    node: Node,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
) -> Response:
    """The node's message for `step` once the stage before it closed; 204 until then."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        message = service.secure.secagg.poll(service.spec(study), number, node.name, step)
        left = deadline - asyncio.get_running_loop().time()
        if message is not None:
            return Response(message.model_dump_json(), media_type="application/json")
        if left <= 0:
            return Response(status_code=204)
        await changes.wait(min(left, LONG_POLL_STEP_S))


@router.post("/v1/studies/{study}/ckks/keys")
async def ckks_keys(
    study: str, request: Request, service: Svc, changes: Notify, node: Node
) -> dict[str, bool]:
    service.secure.ckks.post_keys(service.spec(study), node.name, await small_body(request))
    changes.notify()
    return {"ok": True}


@router.get("/v1/studies/{study}/ckks/keys")
async def ckks_key_info(study: str, service: Svc, node: Node) -> CkksKeyInfo:
    return service.secure.ckks.key_info(study, node.name)


@router.get(ROUND + "/ckks/sum", responses=binary(MEDIA_TYPE))
async def ckks_sum(study: str, number: Number, service: Svc, node: Node) -> Response:
    return Response(service.secure.ckks.bundle(study, number, node.name), media_type=MEDIA_TYPE)


@router.post(ROUND + "/ckks/decrypted")
async def ckks_decrypted(
    study: str, number: Number, request: Request, service: Svc, changes: Notify, node: Node
) -> dict[str, bool]:
    body = await request.body()
    if len(body) > MAX_UPDATE_BYTES:
        raise ConflictError(f"decrypted sum of {len(body)} bytes is too large")
    service.secure.ckks.decrypted(service.spec(study), number, node.name, body)
    changes.notify()
    return {"ok": True}
