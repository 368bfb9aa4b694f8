"""What every round kind's sender shares at a node: what it needs of the node (`RoundNode`, which
`NodeWorker` is), the one audit of a trained contribution, and the one way an update leaves —
signed, framed, charged to the site's ledger with its exact bytes, then uploaded. Also what both
secure senders need: the round's deadline on this clock, the model's layout, and x = [r, r·Δ]
recorded (and audited) before it is masked or encrypted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from aipipe.audit.log import AuditLog
from aipipe.clock import monotonic_deadline
from aipipe.models.training import TrainResult
from aipipe.node.client import HubClient
from aipipe.node.vault import SecureVault
from aipipe.personalization.parts import shared_part
from aipipe.secure.encoding import FloatArray, UpdateLayout, contribution
from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.identity import Identity
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundWork, UpdateHeader, UpdateReceipt, pack_frame
from aipipe.wire.tensors import Arrays


class RoundNode(Protocol):
    """The node as a round's sender sees it."""

    name: str
    client: HubClient
    identity: Identity
    audit: AuditLog
    vault: SecureVault | None

    @property
    def log(self) -> Callable[[str], None]: ...

    def base_weights(self, version: str) -> Arrays: ...

    def signed_header(
        self,
        spec: StudySpec,
        item: RoundWork,
        payload: bytes,
        epsilon: float | None,
        *,
        n: int | None = None,
        norm: float | None = None,
    ) -> UpdateHeader: ...

    def charge_release(self, spec: StudySpec, item: RoundWork, frame: bytes) -> None: ...


def vault_of(node: RoundNode) -> SecureVault:
    if node.vault is None:
        raise SecureAggregationError(f"node {node.name} has no key vault for secure rounds")
    return node.vault


def audit_train(
    node: RoundNode, spec: StudySpec, number: int, n: int, epsilon: float | None, **details: Any
) -> None:
    """The node's record of one trained contribution (its n stays in the node's own log)."""
    node.audit.append(
        "train",
        actor=node.name,
        resource=f"study/{spec.name}",
        details={"round": number, "n": n, "epsilon_total": epsilon, **details},
    )


def charged_frame(
    node: RoundNode,
    spec: StudySpec,
    item: RoundWork,
    payload: bytes,
    epsilon: float | None,
    *,
    n: int | None = None,
    norm: float | None = None,
) -> bytes:
    """The update as it leaves: signed header and payload in one frame, charged to the ledger
    with the sha256 of these exact bytes before anything is sent."""
    header = node.signed_header(spec, item, payload, epsilon, n=n, norm=norm)
    frame = pack_frame(header.model_dump_json().encode(), payload)
    node.charge_release(spec, item, frame)
    return frame


def upload(
    node: RoundNode,
    spec: StudySpec,
    item: RoundWork,
    payload: bytes,
    epsilon: float | None,
    *,
    n: int | None = None,
    norm: float | None = None,
) -> UpdateReceipt:
    """Send one update (plain delta or ciphertext): framed, charged, uploaded."""
    frame = charged_frame(node, spec, item, payload, epsilon, n=n, norm=norm)
    return node.client.upload(spec.name, item.round, frame)


def round_deadline(item: RoundWork) -> float:
    """The round's deadline on this process's monotonic clock."""
    assert item.deadline is not None
    return monotonic_deadline(item.deadline)


def base_layout(worker: RoundNode, spec: StudySpec, item: RoundWork) -> UpdateLayout:
    """The contribution's layout: the round's base model, its shared tensors only."""
    return UpdateLayout.of(shared_part(spec, worker.base_weights(item.version)))


def recorded_contribution(
    worker: RoundNode,
    spec: StudySpec,
    item: RoundWork,
    result: TrainResult,
    layout: UpdateLayout,
    epsilon: float | None,
) -> FloatArray:
    """x = [r, r·clip(Δ)], kept in the node's own records before it is masked or encrypted."""
    x = contribution(
        result.delta,
        result.num_examples,
        layout=layout,
        update_clip=spec.bounds.update_norm,
        max_examples=spec.bounds.max_examples,
    )
    vault_of(worker).record_sent(spec.name, item.round, x)
    digest = hashlib.sha256(x.tobytes()).hexdigest()
    audit_train(
        worker,
        spec,
        item.round,
        result.num_examples,
        epsilon,
        secure=spec.secure,
        contribution_sha256=digest,
    )
    return x
