"""Secure rounds (`secure: secagg | ckks`): what `HubService` hands over when a study asks for them.

The round keeps its usual states in `HubStore` (open → collecting → aggregating → closed or
failed); `SecureStore` adds the protocol stage and its deadline. SecAgg+ lives in
`aipipe.hub.secagg`, CKKS in `aipipe.hub.ckks`; both end in `finish`, which turns the decoded
sum of at least `min_nodes` contributions into the FedAvg mean and hands it to the study's
aggregator — the same `Aggregator.from_sum` a plaintext round uses.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from aipipe.aggregation import aggregator_for
from aipipe.errors import (
    AuthError,
    ConflictError,
    SignatureError,
    StudyError,
    UpdateRejectedError,
)
from aipipe.hub.ckks import CkksRounds
from aipipe.hub.secagg import SecAggRounds
from aipipe.hub.updates import verified_header
from aipipe.secure.encoding import FloatArray, UpdateLayout, check_sum, mean_from_sum
from aipipe.secure.errors import SecAggRoundFailedError, SecureAggregationError
from aipipe.secure.identity import verify_signature
from aipipe.store.hub_store import RoundRow
from aipipe.store.secure_store import SecureStore
from aipipe.wire import EnrolRequest, UpdateHeader, WorkItem
from aipipe.wire.secure import Keyring, KeyringEntry, sealing_key_payload
from aipipe.wire.tensors import decode_arrays

if TYPE_CHECKING:
    from aipipe.hub.service import HubService
    from aipipe.study.spec import StudySpec

# Decoding error allowed on a sum's range check: CKKS errs by ~1e-8 here, fixed point by
# n/(2·scale) < 1e-6 at 32 bits; 1e-3 is far above both and far below a malformed input.
SUM_TOLERANCE = 1e-3


class SecureRounds:
    def __init__(self, service: HubService) -> None:
        self.service = service
        self.store = SecureStore(service.store.conn)
        self.secagg = SecAggRounds(self)
        self.ckks = CkksRounds(self)

    # -- time and lookups ----------------------------------------------------------------------

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    @staticmethod
    def iso(moment: datetime) -> str:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @staticmethod
    def parse(instant: str) -> datetime:
        return datetime.fromisoformat(instant.replace("Z", "+00:00"))

    def round_row(self, study: str, number: int) -> RoundRow:
        row = self.service.store.round(study, number)
        if row is None:
            raise ConflictError(f"study '{study}' has no round {number}")
        return row

    def stage(self, study: str, number: int) -> str | None:
        found = self.store.stage(study, number)
        return None if found is None else found[0]

    def stage_deadline(self, spec: StudySpec, number: int) -> datetime:
        """A stage waits `stage_timeout_s` for late nodes, never past the round's deadline."""
        wait = self.now() + timedelta(seconds=spec.secure_options.stage_timeout_s)
        return min(wait, self.parse(self.round_row(spec.name, number).deadline))

    def stage_expired(self, study: str, number: int) -> bool:
        found = self.store.stage(study, number)
        return found is not None and self.now() >= self.parse(found[1])

    def layout(self, base_version: str) -> UpdateLayout:
        return UpdateLayout.of(decode_arrays(self.service.models.weights(base_version)))

    def selected(self, study: str, number: int) -> list[str]:
        return [str(n["node"]) for n in self.service.store.round_nodes(study, number)]

    def declined(self, study: str, number: int) -> set[str]:
        nodes = self.service.store.round_nodes(study, number)
        return {str(n["node"]) for n in nodes if n["status"] == "declined"}

    def identity_key(self, node: str) -> bytes:
        key = self.service.store.public_key(node)
        if key is None:
            raise SignatureError(f"node '{node}' is not enrolled")
        return key

    # -- enrolment -----------------------------------------------------------------------------

    @staticmethod
    def checked_sealing_key(request: EnrolRequest) -> tuple[bytes, bytes] | None:
        """The (sealing key, signature) a node enrols with, if its identity key signed it."""
        if request.sealing_key is None and request.sealing_signature is None:
            return None
        if request.sealing_key is None or request.sealing_signature is None:
            raise AuthError("a sealing key must come with its identity signature")
        key, signature = (
            bytes.fromhex(request.sealing_key),
            bytes.fromhex(request.sealing_signature),
        )
        try:
            identity = bytes.fromhex(request.public_key)
            verify_signature(identity, signature, sealing_key_payload(request.node, key))
        except SignatureError as exc:
            raise AuthError("the sealing key is not signed by the node's identity key") from exc
        return key, signature

    def keyring(self) -> Keyring:
        sealing = self.store.sealing_keys()
        return Keyring(
            nodes=[
                KeyringEntry(
                    node=row["name"],
                    identity_key=bytes.fromhex(row["public_key"]),
                    sealing_key=sealing.get(row["name"], (None, None))[0],
                    sealing_signature=sealing.get(row["name"], (None, None))[1],
                )
                for row in self.service.store.nodes()
                if row["state"] == "active"
            ]
        )

    # -- round lifecycle -----------------------------------------------------------------------

    @staticmethod
    def check_spec(spec: StudySpec) -> None:
        """Refuse at publish what a secure round could not honour."""
        if spec.secure == "none":
            return
        aggregator = aggregator_for(spec.aggregation, spec.training.proximal_mu)
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

    def eligible(self, spec: StudySpec, nodes: list[str]) -> list[str]:
        return self.ckks.eligible(spec.name, nodes) if spec.secure == "ckks" else nodes

    def open(self, spec: StudySpec, number: int) -> None:
        try:
            if spec.secure == "secagg":
                self.secagg.open(spec, number)
            else:
                self.ckks.open(spec, number)
        except SecureAggregationError as exc:
            self.fail(spec.name, number, str(exc))

    def work(self, spec: StudySpec, row: RoundRow, node: str, digest: str) -> WorkItem | None:
        if spec.secure == "ckks":
            return self.ckks.work(spec, row, node, digest)
        if self.secagg.wants_advert(spec, row.round, node):
            return WorkItem(
                kind="train",
                study=spec.name,
                study_digest=digest,
                round=row.round,
                version=row.base_version,
                deadline=row.deadline,
            )
        return None

    def receive_update(self, spec: StudySpec, node: str, number: int, body: bytes) -> None:
        try:
            header, payload = verified_header(
                self.service, node, spec.name, number, body, secure=spec.secure
            )
        except (UpdateRejectedError, SignatureError) as exc:
            self.refuse(node, spec.name, number, str(exc))
        if spec.secure == "secagg":
            self.secagg.masked_input(spec, header, payload)
        else:
            self.ckks.ciphertext(spec, header, payload)

    def advance(self, spec: StudySpec, number: int) -> None:
        row = self.service.store.round(spec.name, number)
        if row is None or row.state in ("closed", "failed"):
            return
        if spec.secure == "ckks":
            self.ckks.advance(spec, number)
        else:
            self.secagg.advance(spec, number)

    # -- outcomes ------------------------------------------------------------------------------

    def record_update(
        self, study: str, header: UpdateHeader, fold: Callable[[bytes | None], bytes | None]
    ) -> None:
        record = {
            "nonce": header.nonce,
            "num_examples": None,
            "epsilon": header.epsilon_spent,
            "update_norm": None,
            "train_loss": None,
            "payload_sha256": header.payload_sha256,
            "signature": header.signature,
        }
        problem = self.service.store.fold_update(study, header.round, header.node, record, fold)
        if problem is not None:
            self.refuse(header.node, study, header.round, problem)
        self.service.audit.append(
            "update.accepted",
            actor=header.node,
            resource=f"study/{study}/round/{header.round}",
            details={"secure": header.secure, "epsilon": header.epsilon_spent},
        )

    def refuse(self, node: str, study: str, number: int, reason: str) -> NoReturn:
        self.service.refuse_update(node, study, number, reason)

    def need_min_nodes(self, spec: StudySpec, count: int, what: str) -> None:
        if count < spec.min_nodes:
            raise SecAggRoundFailedError(
                f"only {count} {what}; study '{spec.name}' needs min_nodes={spec.min_nodes}, so "
                "the sum is not unmasked"
            )

    def audit_stage(
        self, study: str, number: int, stage: str, count: int, dropped: list[str]
    ) -> None:
        self.service.audit.append(
            "round.stage",
            actor="hub",
            resource=f"study/{study}/round/{number}",
            details={"stage": stage, "nodes": count, "dropped": dropped},
        )

    def fail(self, study: str, number: int, reason: str) -> None:
        self.secagg.forget(study, number)
        self.service.store.set_round_state(study, number, "failed", reason=reason)
        if self.store.stage(study, number) is not None:  # a secure round: its stage too
            self.store.set_stage(study, number, "failed", self.iso(self.now()))
        self.service.audit.append(
            "aggregate",
            actor="hub",
            resource=f"study/{study}/round/{number}",
            outcome="failure",
            details={"reason": reason},
        )

    def finish(
        self, spec: StudySpec, number: int, total: FloatArray, contributors: list[str]
    ) -> None:
        """Turn the decoded Σ[r, r·Δ] into the FedAvg mean and close the round with it."""
        row = self.round_row(spec.name, number)
        try:
            self.need_min_nodes(spec, len(contributors), "contributions are in the sum")
            check_sum(total, len(contributors), spec.bounds.update_norm, SUM_TOLERANCE)
            weighted, examples = mean_from_sum(
                np.asarray(total, dtype=np.float64),
                layout=self.layout(row.base_version),
                max_examples=spec.bounds.max_examples,
            )
        except SecureAggregationError as exc:
            self.fail(spec.name, number, str(exc))
            return
        self.store.set_stage(spec.name, number, "done", self.iso(self.now()))
        self.service.store.set_round_state(spec.name, number, "aggregating")
        lineage = [{"node": n, "secure": spec.secure} for n in contributors]
        self.service.models.publish(row, spec, weighted, examples, lineage)
