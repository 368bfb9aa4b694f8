"""What a round protocol works with: the hub's stores, its audit log, the model registry, a
clock and the study lookup — never the `HubService` that owns them.

The outcomes every protocol shares live here too, written once: refusing an update (audited as
`update.refused`), recording an accepted one (its round-node record and `update.accepted`
audit), failing a round with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NoReturn

from aipipe import clock
from aipipe.aggregation import Aggregator, aggregator_for
from aipipe.audit.log import AuditLog
from aipipe.errors import (
    AipipeError,
    ConflictError,
    RefusalCategory,
    SignatureError,
    UpdateRejectedError,
)
from aipipe.hub.metrics import HubMetrics
from aipipe.hub.models import ModelRegistry
from aipipe.store.hub_rounds import RoundRow
from aipipe.store.hub_store import HubStore
from aipipe.store.secure_store import SecureStore
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundState, UpdateHeader


class NodeStatus(StrEnum):
    """A selected node's part in one round (`round_nodes.status`)."""

    SELECTED = "selected"
    REPORTED = "reported"
    DECLINED = "declined"


class StageEnd(StrEnum):
    """How a secure round's protocol stage ends (`SecureStore` keeps it after the round)."""

    DONE = "done"
    FAILED = "failed"


class Clock:
    """The rounds' clock: `aipipe.clock`'s now and instant spelling, kept behind one object
    so that a protocol can be driven by another clock."""

    def now(self) -> datetime:
        return clock.now()

    iso = staticmethod(clock.iso)
    parse = staticmethod(clock.parse_instant)

    def passed(self, instant: str) -> bool:
        return self.now() >= self.parse(instant)


def _study_aggregator(spec: StudySpec) -> Aggregator:
    return aggregator_for(spec.aggregation, spec.training.proximal_mu)


@dataclass(frozen=True)
class RoundContext:
    store: HubStore
    secure: SecureStore
    audit: AuditLog
    models: ModelRegistry
    spec: Callable[[str], StudySpec]
    clock: Clock = field(default_factory=Clock)
    aggregator: Callable[[StudySpec], Aggregator] = _study_aggregator
    metrics: HubMetrics = field(default_factory=HubMetrics)  # this process's instruments

    # -- lookups -------------------------------------------------------------------------------

    def round_row(self, study: str, number: int) -> RoundRow:
        row = self.store.round(study, number)
        if row is None:
            raise ConflictError(f"study '{study}' has no round {number}")
        return row

    def state(self, study: str, number: int) -> RoundState | None:
        row = self.store.round(study, number)
        return None if row is None else RoundState(row.state)

    def statuses(self, study: str, number: int) -> Mapping[str, NodeStatus]:
        """Every selected node of the round and its status, by name."""
        return {
            str(n["node"]): NodeStatus(n["status"]) for n in self.store.round_nodes(study, number)
        }

    def with_status(self, study: str, number: int, status: NodeStatus) -> list[str]:
        return [n for n, s in self.statuses(study, number).items() if s is status]

    def study_digest(self, study: str) -> str:
        row = self.store.study(study)
        assert row is not None  # a round's study is published
        return str(row["digest"])

    # -- outcomes ------------------------------------------------------------------------------

    def refuse(
        self,
        node: str,
        study: str,
        number: int,
        reason: str,
        category: RefusalCategory = "protocol",
    ) -> NoReturn:
        """Audit and raise the refusal of an update or protocol message."""
        self.metrics.refusal(category)
        self.audit.append(
            "update.refused",
            actor=node,
            resource=f"study/{study}/round/{number}",
            outcome="refused",
            details={"reason": reason, "category": category},
        )
        raise UpdateRejectedError.of(reason, category)

    def refuse_error(self, node: str, study: str, number: int, exc: AipipeError) -> NoReturn:
        """`refuse` with an error's message, in its category (a bad signature's is `signature`,
        an error from a secure round's maths `protocol`)."""
        if isinstance(exc, UpdateRejectedError):
            category = exc.category
        else:
            category = "signature" if isinstance(exc, SignatureError) else "protocol"
        self.refuse(node, study, number, str(exc), category)

    def record_update(
        self,
        header: UpdateHeader,
        fold: Callable[[bytes | None], bytes | None],
        audit: Mapping[str, Any],
    ) -> None:
        """Keep an accepted update's record and fold it into the round's sum in one transaction;
        audit it as accepted with `audit`, or refuse it with why it could not be taken."""
        record = {
            "nonce": header.nonce,
            "num_examples": header.num_examples,
            "epsilon": header.epsilon_spent,
            "update_norm": header.update_norm,
            "train_loss": header.train_loss,
            "payload_sha256": header.payload_sha256,
            "signature": header.signature,
        }
        study, number, node = header.study, header.round, header.node
        try:
            problem = self.store.fold_update(study, number, node, record, fold)
        except UpdateRejectedError as exc:  # raised inside the transaction: nothing was folded
            problem = exc
        if problem is not None:
            self.refuse_error(node, study, number, problem)
        self.audit.append(
            "update.accepted",
            actor=node,
            resource=f"study/{study}/round/{number}",
            details=dict(audit),
        )

    def fail(self, study: str, number: int, reason: str) -> None:
        """Fail the round with `reason` (and its secure stage, if it has one), audited."""
        self.store.set_round_state(study, number, RoundState.FAILED, reason=reason)
        if self.secure.stage(study, number) is not None:
            self.secure.set_stage(study, number, StageEnd.FAILED, self.clock.iso(self.clock.now()))
        self.audit.append(
            "aggregate",
            actor="hub",
            resource=f"study/{study}/round/{number}",
            outcome="failure",
            details={"reason": reason},
        )
