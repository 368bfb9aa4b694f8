"""Verify an uploaded update before it may touch a round's sum.

Order matters: cheap structural checks first, then the signature (so an unsigned or tampered
update is refused before its payload is parsed), then the binding to this round's study,
digest and base version, then the tensors against the base model.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import ValidationError

from aipipe.errors import SignatureError, UpdateRejectedError
from aipipe.hub.rounds.context import RoundContext
from aipipe.personalization.parts import shared_part
from aipipe.secure.identity import verify_signature
from aipipe.study.blocks import Bounds
from aipipe.wire import FrameError, SecureMode, UpdateHeader, unpack_frame
from aipipe.wire.tensors import Arrays, TensorDecodeError, decode_arrays


def verified_update(
    ctx: RoundContext, node: str, study: str, number: int, body: bytes
) -> tuple[UpdateHeader, bytes, Arrays]:
    """A plaintext update's header, payload and delta, checked against the round's base model."""
    header, payload = verified_header(ctx, node, study, number, body, secure=SecureMode.NONE)
    row = ctx.round_row(study, number)  # verified_header checked it exists
    base = shared_part(ctx.spec(study), decode_arrays(ctx.models.weights(row.base_version)))
    delta = _checked_delta(base, payload)
    check_norm(header, delta)
    check_bounds(ctx.spec(study).bounds, header)
    return header, payload, delta


def verified_header(
    ctx: RoundContext, node: str, study: str, number: int, body: bytes, *, secure: SecureMode
) -> tuple[UpdateHeader, bytes]:
    """The signed header and raw payload of any update (plain, masked or encrypted)."""
    try:
        header_json, payload = unpack_frame(body)
        header = UpdateHeader.model_validate_json(header_json)
    except FrameError as exc:
        raise UpdateRejectedError.of(
            f"malformed update: {str(exc).splitlines()[0]}", "malformed"
        ) from exc
    except ValidationError as exc:  # name the field, not its value
        first = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise UpdateRejectedError.of(
            f"malformed update header: {where}: {first['msg']}", "malformed"
        ) from exc
    if header.node != node:
        raise UpdateRejectedError.of(
            f"update names node '{header.node}' but came from '{node}'", "signature"
        )
    _check_signature(ctx, node, header)
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise UpdateRejectedError.of(
            "payload does not match its signed sha256 (tampered)", "signature"
        )
    if header.study != study or header.round != number:
        raise UpdateRejectedError.of(
            f"update is bound to {header.study} round {header.round}, not {study} round {number}",
            "stale",
        )
    row = ctx.store.round(study, number)
    if row is None:
        raise UpdateRejectedError.of(f"study '{study}' has no round {number}", "stale")
    if header.base_version != row.base_version:
        raise UpdateRejectedError.of(
            f"update was trained on {header.base_version[:12]} but round {number} started from "
            f"{row.base_version[:12]}",
            "stale",
        )
    if header.study_digest != ctx.study_digest(study):
        raise UpdateRejectedError.of(
            "update was trained for a different version of the study", "stale"
        )
    if header.secure != secure:
        raise UpdateRejectedError.of(
            f"study '{study}' takes secure: {secure} updates; this one is {header.secure}",
            "malformed",
        )
    return header, payload


def _check_signature(ctx: RoundContext, node: str, header: UpdateHeader) -> None:
    if not header.signature:
        raise UpdateRejectedError.of("update is not signed", "signature")
    key = ctx.store.public_key(node)
    if key is None:
        raise UpdateRejectedError.of(f"node '{node}' is not enrolled", "signature")
    try:
        signature = bytes.fromhex(header.signature)
        verify_signature(key, signature, header.signing_bytes())
    except (ValueError, SignatureError) as exc:
        raise UpdateRejectedError.of(
            "update signature does not verify with the node's key", "signature"
        ) from exc


def _checked_delta(base: Arrays, payload: bytes) -> Arrays:
    """The update's tensors: exactly the base model's shared ones (`base`), finite, in shape."""
    try:
        delta = decode_arrays(payload)
    except TensorDecodeError as exc:
        raise UpdateRejectedError.of(str(exc), "malformed") from exc
    if set(delta) != set(base):
        raise UpdateRejectedError.of(_names_problem(sorted(delta), sorted(base)), "malformed")
    for key, value in delta.items():
        if value.shape != base[key].shape:
            raise UpdateRejectedError.of(
                f"tensor '{key}' has shape {value.shape}, expected {base[key].shape}", "malformed"
            )
        if not np.all(np.isfinite(value)):
            raise UpdateRejectedError.of(f"tensor '{key}' holds NaN or infinity", "bounds")
    return delta


def _names_problem(sent: list[str], shared: list[str]) -> str:
    """Why an update's tensor names are refused: what it carries beyond the study's shared
    tensors (a personalized study's local part never leaves a node) and what it lacks."""
    unexpected = [name for name in sent if name not in shared]
    missing = [name for name in shared if name not in sent]
    parts = []
    if unexpected:
        parts.append(f"carries tensors that are not shared: {', '.join(unexpected[:20])}")
    if missing:
        parts.append(f"lacks shared tensors: {', '.join(missing[:20])}")
    return (
        f"update tensors do not match the study's shared parameters: {'; '.join(parts)} "
        "(only the shared part of a personalized model is sent; is the node's aipipe current?)"
    )


def check_norm(header: UpdateHeader, delta: Arrays) -> None:
    """The signed `update_norm` goes into the model's lineage: it must be the payload's."""
    actual = float(
        np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))
    )
    if header.update_norm is None:
        raise UpdateRejectedError.of("a plaintext update must state its norm", "malformed")
    if abs(actual - header.update_norm) > 1e-4 * max(1.0, actual):
        raise UpdateRejectedError.of(
            f"update claims norm {header.update_norm:.6g} but its tensors have {actual:.6g}",
            "malformed",
        )


# The signed norm may differ from the payload's by check_norm's tolerance, and a node's float32
# clipping lands a hair above its target: allow that much over the bound, no more.
_NORM_SLACK = 1e-4


def check_bounds(bounds: Bounds, header: UpdateHeader) -> None:
    """The study's `bounds`: one site may neither claim more rows nor move the model further
    (without them one update with n = 10¹² and Δ = target − base sets the model)."""
    assert header.num_examples is not None and header.update_norm is not None
    if header.num_examples > bounds.max_examples:
        raise UpdateRejectedError.of(
            f"update claims n={header.num_examples} but the study allows at most "
            f"max_examples={bounds.max_examples} per site; a node counts at most that many rows",
            "bounds",
        )
    if header.update_norm > bounds.update_norm * (1 + _NORM_SLACK):
        raise UpdateRejectedError.of(
            f"update has norm {header.update_norm:.6g} but the study allows at most "
            f"update_norm={bounds.update_norm:g}; a node clips its update to that norm",
            "bounds",
        )
