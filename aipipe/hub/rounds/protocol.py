"""`RoundProtocol`: how one kind of round runs at the hub, behind one interface.

`HubService` opens rounds, asks for work, hands over uploads and ticks deadlines; which
protocol does the work is picked by the study's `secure:` mode from `PROTOCOLS` (as
aggregators are picked by name). Modelled on Flower's `Strategy` (configure, aggregate) and its
SecAgg+ workflow stages:

    open(spec, n)                   the round is in the store; set up what the protocol needs
    work(spec, row, node, digest)   what `node` is asked to do now, or None
    accept(spec, node, n, body)     one signed upload (a plain delta, masked vector, ciphertext)
    advance(spec, n)                close a stage or the round once everyone answered or time is up
    finish(spec, n)                 the round's sum and its contributors, for the server step

`advance` ends in `conclude`, which publishes what `finish` returned through the model
registry, or fails the round if `finish` could not make a sum.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

from aipipe.hub.models import RoundSum
from aipipe.hub.rounds.context import RoundContext
from aipipe.store.hub_rounds import RoundRow
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundState, RoundWork, SecureMode


class RoundProtocol(ABC):
    mode: ClassVar[SecureMode]

    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx

    def check_spec(self, spec: StudySpec) -> None:  # noqa: B027 (optional hook)
        """Refuse at publish what this protocol could not honour (nothing, by default)."""

    def eligible(self, spec: StudySpec, nodes: list[str]) -> list[str]:
        """Which of the study's eligible nodes this protocol can select (all, by default)."""
        return nodes

    @abstractmethod
    def open(self, spec: StudySpec, number: int) -> None: ...

    @abstractmethod
    def work(self, spec: StudySpec, row: RoundRow, node: str, digest: str) -> RoundWork | None: ...

    @abstractmethod
    def accept(self, spec: StudySpec, node: str, number: int, body: bytes) -> None: ...

    @abstractmethod
    def advance(self, spec: StudySpec, number: int) -> None: ...

    @abstractmethod
    def finish(self, spec: StudySpec, number: int) -> RoundSum | None:
        """The round's sum and contributors; None once the round was failed for a reason."""

    def stage(self, study: str, number: int) -> str | None:
        """The protocol's stage within an active round, for `RoundInfo.stage`."""
        return None

    def fail(self, study: str, number: int, reason: str) -> None:
        self.ctx.fail(study, number, reason)

    def conclude(self, spec: StudySpec, number: int) -> None:
        """Finish the round and hand its sum to the study's server step."""
        aggregated = self.ctx.metrics.concluding(
            self.ctx.store, spec.name, number, self.ctx.clock.now()
        )
        result = self.finish(spec, number)
        if result is None:
            return
        self.ctx.store.set_round_state(spec.name, number, RoundState.AGGREGATING)
        self.ctx.models.publish(self.ctx.round_row(spec.name, number), spec, result)
        aggregated()

    def work_item(
        self,
        kind: Literal["train", "keygen", "decrypt"],
        spec: StudySpec,
        row: RoundRow,
        digest: str,
    ) -> RoundWork:
        """A round step for a node, bound to this round's study, base model and deadline."""
        return RoundWork(
            kind=kind,
            study=spec.name,
            study_digest=digest,
            round=row.round,
            version=row.base_version,
            deadline=row.deadline,
        )
