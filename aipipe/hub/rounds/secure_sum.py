"""What the secure protocols (SecAgg+, CKKS) share: stages with deadlines, signed uploads of
masked or encrypted vectors, and the end of every secure round — a decoded Σ[r, r·Δ] of at
least `min_nodes` contributions, range-checked and turned into the FedAvg sum the study's
aggregator steps from (`Aggregator.from_sum`, the same maths a plaintext round's finalize runs).

The round keeps its usual states in `HubStore` (open → collecting → aggregating → closed or
failed); `SecureStore` adds the protocol stage and its deadline.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from datetime import datetime, timedelta

import numpy as np

from aipipe.aggregation import Aggregator
from aipipe.errors import SignatureError, StudyError, UpdateRejectedError
from aipipe.hub.models import RoundSum
from aipipe.hub.rounds.context import StageEnd
from aipipe.hub.rounds.protocol import RoundProtocol
from aipipe.hub.updates import verified_header
from aipipe.personalization.parts import shared_part
from aipipe.secure.encoding import FloatArray, UpdateLayout, check_sum, mean_from_sum
from aipipe.secure.errors import SecAggRoundFailedError, SecureAggregationError
from aipipe.study.spec import StudySpec
from aipipe.wire import UpdateHeader
from aipipe.wire.tensors import decode_arrays

# Decoding error allowed on a sum's range check: CKKS errs by ~1e-8 here, fixed point by
# n/(2·scale) < 1e-6 at 32 bits; 1e-3 is far above both and far below a malformed input.
SUM_TOLERANCE = 1e-3


def check_secure_spec(spec: StudySpec, aggregator: Aggregator) -> None:
    """Refuse at publish what a secure round could not honour."""
    if aggregator.requires_individual_updates:
        raise StudyError(
            f"aggregation '{aggregator.name}' needs every update on its own, which secure: "
            f"{spec.secure} hides from the hub; use fedavg, fedprox, fedadam or fedyogi, or "
            "publish with secure: none"
        )
    if spec.min_nodes < 3:
        raise StudyError(
            f"study '{spec.name}' asks for secure: {spec.secure} with min_nodes="
            f"{spec.min_nodes}; a sum of fewer than 3 updates lets each contributor read the "
            "other's, so secure studies need min_nodes ≥ 3"
        )


class SecureProtocol(RoundProtocol):
    def check_spec(self, spec: StudySpec) -> None:
        check_secure_spec(spec, self.ctx.aggregator(spec))

    # -- stages --------------------------------------------------------------------------------

    def stage(self, study: str, number: int) -> str | None:
        found = self.ctx.secure.stage(study, number)
        return None if found is None else found[0]

    def stage_deadline(self, spec: StudySpec, number: int) -> datetime:
        """A stage waits `stage_timeout_s` for late nodes, never past the round's deadline."""
        clock = self.ctx.clock
        wait = clock.now() + timedelta(seconds=spec.secure_options.stage_timeout_s)
        return min(wait, clock.parse(self.ctx.round_row(spec.name, number).deadline))

    def stage_expired(self, study: str, number: int) -> bool:
        found = self.ctx.secure.stage(study, number)
        return found is not None and self.ctx.clock.passed(found[1])

    def audit_stage(
        self, study: str, number: int, stage: str, count: int, dropped: list[str]
    ) -> None:
        self.ctx.audit.append(
            "round.stage",
            actor="hub",
            resource=f"study/{study}/round/{number}",
            details={"stage": stage, "nodes": count, "dropped": dropped},
        )

    @staticmethod
    def need_min_nodes(spec: StudySpec, count: int, what: str) -> None:
        if count < spec.min_nodes:
            raise SecAggRoundFailedError(
                f"only {count} {what}; study '{spec.name}' needs min_nodes={spec.min_nodes}, so "
                "the sum is not unmasked"
            )

    def layout(self, spec: StudySpec, base_version: str) -> UpdateLayout:
        """The contribution vector's layout: the base model's shared tensors only."""
        base = decode_arrays(self.ctx.models.weights(base_version))
        return UpdateLayout.of(shared_part(spec, base))

    def selected(self, study: str, number: int) -> list[str]:
        return list(self.ctx.statuses(study, number))

    # -- uploads -------------------------------------------------------------------------------

    def accept(self, spec: StudySpec, node: str, number: int, body: bytes) -> None:
        mode = self.mode
        try:
            header, payload = verified_header(self.ctx, node, spec.name, number, body, secure=mode)
        except (UpdateRejectedError, SignatureError) as exc:
            self.ctx.refuse_error(node, spec.name, number, exc)
        self.take(spec, header, payload)

    @abstractmethod
    def take(self, spec: StudySpec, header: UpdateHeader, payload: bytes) -> None:
        """Fold one verified masked vector or ciphertext into the round (`record`)."""

    def record(self, header: UpdateHeader, fold: Callable[[bytes | None], bytes | None]) -> None:
        """Keep a secure update's record (no n, no norm: the hub learns only their sums)."""
        audit = {"secure": header.secure, "epsilon": header.epsilon_spent}
        try:
            self.ctx.record_update(header.model_copy(update={"train_loss": None}), fold, audit)
        except SecureAggregationError as exc:
            self.ctx.refuse_error(header.node, header.study, header.round, exc)

    # -- the end -------------------------------------------------------------------------------

    @abstractmethod
    def decoded_sum(self, spec: StudySpec, number: int) -> tuple[FloatArray, list[str]]:
        """The unmasked or decrypted Σ[r, r·Δ] and who is in it."""

    def finish(self, spec: StudySpec, number: int) -> RoundSum | None:
        """Turn the decoded Σ[r, r·Δ] into the FedAvg sum, or fail the round with why not."""
        row = self.ctx.round_row(spec.name, number)
        try:
            total, contributors = self.decoded_sum(spec, number)
            self.need_min_nodes(spec, len(contributors), "contributions are in the sum")
            check_sum(total, len(contributors), spec.bounds.update_norm, SUM_TOLERANCE)
            weighted, examples = mean_from_sum(
                np.asarray(total, dtype=np.float64),
                layout=self.layout(spec, row.base_version),
                max_examples=spec.bounds.max_examples,
            )
        except SecureAggregationError as exc:
            self.fail(spec.name, number, str(exc))
            return None
        clock = self.ctx.clock
        self.ctx.secure.set_stage(spec.name, number, StageEnd.DONE, clock.iso(clock.now()))
        lineage = [{"node": n, "secure": spec.secure} for n in contributors]
        return RoundSum(lineage, examples, weighted_sum=weighted)
