"""Plaintext rounds (`secure: none`): the study's `Aggregator` folds each verified delta.

A streaming aggregator (FedAvg, FedProx, FedOpt) is rebuilt for each update from the state it
left in the round (`Aggregator.get_state`, kept as the round's sum blob in the same transaction
that records the update), accumulates the delta, and its new state replaces the old: a hub
restarted mid-round resumes the fold from the store. An aggregator that needs every update on
its own (`requires_individual_updates`) gets each payload kept as a content-addressed blob,
referenced by the round's record of that node (`payload_sha256`), and sees them all at the end.
So does every aggregator of a study with a `detection:` block: at the end the round's updates are
scored (`aipipe.hub.rounds.screening`), and those it flags are left out when the study says so.

    open ──first update──▶ collecting ──all reported, or deadline with ≥ min_nodes──▶ aggregating
      │                        │                                                        │
      └──deadline with < min_nodes, or every node declined──▶ failed(reason)           ▼
                                                                                       closed
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from aipipe.aggregation import AggregationError, Aggregator
from aipipe.errors import SignatureError, UpdateRejectedError
from aipipe.hub.models import RoundSum
from aipipe.hub.rounds.context import NodeStatus
from aipipe.hub.rounds.protocol import RoundProtocol
from aipipe.hub.rounds.screening import admitted, screen
from aipipe.hub.updates import verified_update
from aipipe.personalization.parts import shared_part
from aipipe.store.hub_rounds import RoundRow
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundState, RoundWork, SecureMode, UpdateHeader
from aipipe.wire.tensors import Arrays, decode_arrays, encode_arrays

Fold = Callable[[bytes | None], bytes | None]
"""Maps a round's stored state to the new one, inside the transaction that records an update."""


class PlainRound(RoundProtocol):
    mode = SecureMode.NONE

    def eligible(self, spec: StudySpec, nodes: list[str]) -> list[str]:
        """Under `detection`, a node whose reputation fell under the floor is not selected."""
        return admitted(self.ctx, spec, nodes)

    def open(self, spec: StudySpec, number: int) -> None:
        """Nothing beyond the store's round: the first update begins the aggregator's fold."""

    def work(self, spec: StudySpec, row: RoundRow, node: str, digest: str) -> RoundWork | None:
        status = self.ctx.store.node_status(spec.name, row.round, node)
        if RoundState(row.state).active and status == NodeStatus.SELECTED:
            return self.work_item("train", spec, row, digest)
        return None

    def accept(self, spec: StudySpec, node: str, number: int, body: bytes) -> None:
        try:
            header, payload, delta = verified_update(self.ctx, node, spec.name, number, body)
        except (UpdateRejectedError, SignatureError) as exc:
            self.ctx.refuse_error(node, spec.name, number, exc)
        fold: Fold
        if self._keeps_payloads(spec):
            fold = self._kept(payload)
        else:
            fold = self._folded(spec, number, header, delta)
        norm = header.update_norm
        assert norm is not None  # a plaintext header states it
        audit = {"n": header.num_examples, "epsilon": header.epsilon_spent}
        self.ctx.record_update(header, fold, {**audit, "update_norm": round(norm, 6)})
        self.advance(spec, number)

    def _folded(self, spec: StudySpec, number: int, header: UpdateHeader, delta: Arrays) -> Fold:
        n = header.num_examples
        assert n is not None  # a plaintext header states it

        def fold(previous: bytes | None) -> bytes:
            """Inside the accepting transaction: the aggregator's state with this update in."""
            aggregator = self._resumed(spec, number, previous)
            try:
                aggregator.accumulate(delta, n)
            except AggregationError as exc:
                raise UpdateRejectedError.of(str(exc), "bounds") from exc
            state = aggregator.get_state()
            if not all(np.all(np.isfinite(v)) for v in state.values()):
                raise UpdateRejectedError.of(
                    "the round's sum would not be finite with this update", "bounds"
                )
            # the tensor codec carries floats only: the example count travels as a float64
            return encode_arrays({k: _as_float(v) for k, v in state.items()})

        return fold

    def _keeps_payloads(self, spec: StudySpec) -> bool:
        """Every update kept on its own, to be read at the end, instead of folded as it comes."""
        return spec.detection is not None or self.ctx.aggregator(spec).requires_individual_updates

    def _kept(self, payload: bytes) -> Fold:
        def keep(previous: bytes | None) -> None:
            self.ctx.store.put_blob(payload)  # addressed by sha256 = the header's payload_sha256
            return None

        return keep

    def _resumed(self, spec: StudySpec, number: int, state: bytes | None) -> Aggregator:
        """The study's aggregator with this round's fold so far (begun on the base model's
        shared part)."""
        aggregator = self.ctx.aggregator(spec)
        if state is None:
            base = self.ctx.round_row(spec.name, number).base_version
            aggregator.begin(shared_part(spec, decode_arrays(self.ctx.models.weights(base))))
        else:
            aggregator.set_state(decode_arrays(state))
        return aggregator

    def advance(self, spec: StudySpec, number: int) -> None:
        row = self.ctx.store.round(spec.name, number)
        if row is None:
            return
        state = RoundState(row.state)
        if state is RoundState.AGGREGATING:  # a hub that stopped while aggregating
            self.conclude(spec, number)
            return
        if not state.active:
            return
        statuses = list(self.ctx.statuses(spec.name, number).values())
        reported = statuses.count(NodeStatus.REPORTED)
        pending = statuses.count(NodeStatus.SELECTED)
        if pending and not self.ctx.clock.passed(row.deadline):
            return
        if reported >= spec.min_nodes:
            self.conclude(spec, number)
            return
        why = "by the deadline" if pending else "(the others declined)"
        self.fail(
            spec.name,
            number,
            f"{reported} of {len(statuses)} selected nodes reported {why}; "
            f"study '{spec.name}' needs min_nodes={spec.min_nodes}",
        )

    def finish(self, spec: StudySpec, number: int) -> RoundSum:
        row = self.ctx.round_row(spec.name, number)
        reported = [
            n
            for n in self.ctx.store.round_nodes(spec.name, number)
            if n["status"] == NodeStatus.REPORTED
        ]
        contributors = [
            {
                "node": n["node"],
                "n": n["num_examples"],
                "epsilon": n["epsilon"],
                "update_norm": n["update_norm"],
            }
            for n in reported
        ]
        if not self._keeps_payloads(spec):
            aggregator = self._resumed(spec, number, row.sum_blob)
            return RoundSum(contributors, row.total_examples, folded=aggregator)
        deltas = {
            str(n["node"]): decode_arrays(self.ctx.store.blob(n["payload_sha256"]))
            for n in reported
        }
        left_out: list[dict[str, Any]] = []
        if spec.detection is not None:
            verdicts = screen(self.ctx, spec, number, deltas)
            scored = [{**c, **verdicts[c["node"]]} for c in contributors]
            contributors = [c for c in scored if not c["excluded"]]
            left_out = [c for c in scored if c["excluded"]]
        aggregator = self.ctx.aggregator(spec)
        base = decode_arrays(self.ctx.models.weights(row.base_version))
        aggregator.begin(shared_part(spec, base))
        for c in contributors:
            aggregator.accumulate(deltas[c["node"]], int(c["n"]))
        total = sum(int(c["n"]) for c in contributors)
        return RoundSum(contributors, total, folded=aggregator, excluded=left_out)


def _as_float(value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return value if np.issubdtype(value.dtype, np.floating) else value.astype(np.float64)
