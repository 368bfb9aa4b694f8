"""What a node does with one work item: train for a round, or evaluate a new model.

Training order is what keeps the privacy promise: the study must be approved at this digest;
the round's noise is planned so the study fits min(its share, what is left of the site) and a
round that would not fit is declined (the node asks to be excluded from the study); the round's
cost and the sha256 of the exact bytes are charged to the site ledger in one transaction BEFORE
they are sent; a round offered again gets those same bytes, or a refusal, never a new draw.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from aipipe.attacks import Attack
from aipipe.audit.log import AuditLog
from aipipe.errors import (
    AipipeError,
    ConflictError,
    StudyError,
    StudyNotApprovedError,
)
from aipipe.models import ModelError, arrays_to_model
from aipipe.models.training import TrainResult, clip_update
from aipipe.node import secure_rounds
from aipipe.node.client import HubClient
from aipipe.node.evaluating import evaluate_work
from aipipe.node.extraction import audited_extract
from aipipe.node.lineage import ModelLineage
from aipipe.node.personal_pending import Guard, has_pending, make_pending
from aipipe.node.personal_state import PersonalStates, keep_state
from aipipe.node.round_state import RoundStates
from aipipe.node.secagg_node import run_secagg
from aipipe.node.senders import sender_for
from aipipe.node.site import audit_cohorts, audit_refusal
from aipipe.node.stats_release import report_stats
from aipipe.node.vault import SecureVault
from aipipe.personalization import SiteData, personalizer_for
from aipipe.privacy.cohorts import DISJOINT, Cohort
from aipipe.privacy.engine import Plan, PrivacyEngine
from aipipe.privacy.errors import BudgetExhaustedError, PrivacyError, RoundAlreadyReleasedError
from aipipe.privacy.ledger import BudgetLedger
from aipipe.privacy.ledger_records import TRAIN, LedgerEntry
from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.identity import Identity
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix
from aipipe.study.spec import StudySpec
from aipipe.wire import (
    EvaluateWork,
    RoundWork,
    SecureMode,
    UpdateHeader,
)
from aipipe.wire.tensors import Arrays, decode_arrays


def _quiet(message: str) -> None:
    """The default progress log: none (the daemon passes its own)."""


@dataclass
class NodeWorker:
    name: str
    store: NodeStore
    client: HubClient
    identity: Identity
    audit: AuditLog
    allow_non_private: bool = False
    vault: SecureVault | None = None
    log: Callable[[str], None] = _quiet
    # study → digest of work declined because the study is not approved (at that digest)
    unapproved: dict[str, str | None] = field(default_factory=dict)
    _features: dict[str, FeatureMatrix] = field(default_factory=dict)
    _cohorts: dict[str, Cohort] = field(default_factory=dict)  # of the cached features
    _weights: dict[str, Arrays] = field(default_factory=dict)
    # (study, round) → the mechanism planned for it, charged with its bytes just before they leave
    _planned: dict[tuple[str, int], Plan] = field(default_factory=dict)
    attack: Attack | None = None  # a poisoning node, for tests and benchmarks (aipipe.attacks)
    # (study, round) → (base version, method, local state, sha256 of the one it started from),
    # kept once the round is charged
    _states: dict[tuple[str, int], tuple[str, str, Arrays, str | None]] = field(
        default_factory=dict
    )

    def handle(self, item: EvaluateWork | RoundWork) -> str:
        """Do one work item; return a one-line summary for logs (counts only, no PHI)."""
        try:
            spec = self.approved_spec(item.study, item.study_digest)
        except StudyNotApprovedError as exc:
            self.unapproved[item.study] = item.study_digest
            if item.kind == "train":
                self.client.decline(item.study, item.round, str(exc), exclude=False)
            return f"declined {item.study}: {exc}"
        if isinstance(item, EvaluateWork):
            return evaluate_work(self, spec, item)
        step = _KEY_HOLDER_STEPS.get(item.kind)
        if step is not None:
            try:
                return step(self, spec, item)
            except SecureAggregationError as exc:
                audit_refusal(self, f"secure.{item.kind}", spec, item.round, exc)
                return f"round {item.round}: refused to {item.kind}: {exc}"
        try:
            return self._train(spec, item)
        except (StudyError, PrivacyError, ModelError, SecureAggregationError) as exc:
            # The node cannot take part (data does not fit the study, no budget set, a secure
            # round it refuses to go on with, ...): say so to the hub rather than leave the round
            # waiting for its deadline. Past its masked input a node has nothing to decline.
            audit_refusal(self, "train", spec, item.round, exc)
            with contextlib.suppress(ConflictError):
                self.client.decline(spec.name, item.round, _hub_reason(spec, exc), exclude=False)
            return f"round {item.round}: declined: {exc}"

    def declined_studies(self) -> list[str]:
        """Studies whose work this node declined for want of approval and that are still not
        approved: the daemon asks the hub to skip them until `node approve` changes that."""
        for study, digest in list(self.unapproved.items()):
            approval = self.store.approval(study)
            if approval is not None and (digest is None or approval[0] == digest):
                del self.unapproved[study]
        return sorted(self.unapproved)

    def pending_personal(self) -> bool:
        """Whether a personal model waits to be made (`aipipe.node.personal_pending`)."""
        return has_pending(self)

    def make_personal(self, guard: Guard = contextlib.nullcontext) -> list[str]:
        """Make the pending personal models, the newest version per study; one line each."""
        return make_pending(self, guard)

    def resume_secure_rounds(self) -> list[str]:
        """Go on with the SecAgg+ rounds a previous process of this node left half done (their
        state sealed on disk); ε was charged then and is not charged again. One line each."""
        if self.vault is None:
            return []
        states, out = RoundStates(self.vault), []
        for path in states.pending():
            try:
                state = states.load(path)
                spec = self.approved_spec(state.study, state.item.study_digest)
            except AipipeError as exc:  # sealed by another key, tampered, or study withdrawn
                path.unlink(missing_ok=True)
                out.append(f"dropped a saved SecAgg+ round: {exc}")
                continue
            self._plan_again(spec, state.number, state.sigma)
            train = functools.partial(self._retrain, spec, state.item, state.sigma)
            try:
                out.append(f"resumed {run_secagg(self, spec, state, train)}")
            except AipipeError as exc:
                out.append(f"round {state.number} of '{state.study}' ended on resume: {exc}")
        return out

    def _plan_again(self, spec: StudySpec, number: int, sigma: float | None) -> None:
        """The plan a resumed round's masked input is charged with, if it has yet to be made
        (a node that died before masking trains again, and that release must be charged)."""
        if spec.privacy.mode != "dp" or sigma is None:
            return
        rows = len(self.features(spec).y_train)
        self._planned[(spec.name, number)] = self.privacy().resume_round(spec, number, rows, sigma)

    def _retrain(self, spec: StudySpec, item: RoundWork, sigma: float | None) -> TrainResult:
        return self._local_update(spec, item, self.features(spec), sigma)

    def base_weights(self, version: str) -> Arrays:
        """A model version's weights, fetched once (a secure round reads them twice)."""
        if version not in self._weights:
            self._weights.clear()
            self._weights[version] = decode_arrays(self.client.model_weights(version))
        return self._weights[version]

    def approved_spec(self, study: str, digest: str | None) -> StudySpec:
        approval = self.store.approval(study)
        if approval is None:
            raise StudyNotApprovedError(f"study '{study}' is not approved on node {self.name}")
        if digest is not None and approval[0] != digest:
            raise StudyNotApprovedError(
                f"study '{study}' changed since it was approved (digest {digest[:12]} ≠ "
                f"{approval[0][:12]}); review it and run `aipipe node approve` again"
            )
        return StudySpec.model_validate(json.loads(approval[1]))

    def features(self, spec: StudySpec) -> FeatureMatrix:
        if spec.name not in self._features:
            matrix = audited_extract(self.store, self.audit, self.name, spec)
            self._features[spec.name] = matrix
            # Under secure aggregation the hub must not learn a site's n or statistics: no
            # pooled preprocessing for hub-side CDS then; score with `node serve-cds`.
            report_stats(self, spec, matrix)
        return self._features[spec.name]

    def _train(self, spec: StudySpec, item: RoundWork) -> str:
        if spec.privacy.mode == "dp":
            released = BudgetLedger(self.store.db).released(spec.name, TRAIN, item.round)
            if released is not None:
                return self._send_again(spec, item.round, *released)
        matrix = self.features(spec)
        charged = self._charge_budget(spec, item.round, len(matrix.y_train))
        if isinstance(charged, str):
            return charged
        sigma, epsilon = charged
        ModelLineage(self.store.db).record_round(spec.name, item.round, item.version)

        def local_update() -> TrainResult:
            return self._local_update(spec, item, matrix, sigma)

        return sender_for(spec).send(self, spec, item, local_update, epsilon, sigma)

    def _charge_budget(
        self, spec: StudySpec, number: int, train_rows: int
    ) -> tuple[float | None, float | None] | str:
        """(σ, the study's ε once this round is released) if the round fits the study's share
        and the site's total; a summary string if declined. The charge itself is written with
        the round's bytes by `charge_release`, just before they leave."""
        if spec.privacy.mode != "dp":
            if self.allow_non_private:
                return None, None
            reason = f"node {self.name} does not allow training without DP (privacy: none)"
            self.client.decline(spec.name, number, reason, exclude=True)
            return f"round {number}: {reason}"
        try:
            plan = self.privacy().plan_round(spec, number, train_rows, self.cohort(spec))
        except BudgetExhaustedError as exc:
            self.audit.append(
                "train",
                actor=self.name,
                resource=f"study/{spec.name}",
                outcome="refused",
                details={"round": number, "reason": str(exc)},
            )
            self.client.decline(spec.name, number, _hub_reason(spec, exc), exclude=True)
            return f"round {number}: budget exhausted, declined"
        self._planned[(spec.name, number)] = plan
        return plan.noise_multiplier, plan.epsilon

    def charge_release(self, spec: StudySpec, item: RoundWork, frame: bytes) -> None:
        """Charge the round's planned mechanism with the sha256 of `frame`, the exact bytes
        about to leave, in one transaction; keep the bytes to send again when the hub offers
        the round again (not under SecAgg+, whose masks are bound to one run's keys). Raises
        `BudgetExhaustedError` if the budget went meanwhile: then nothing leaves."""
        planned = self._planned.pop((spec.name, item.round), None)
        if planned is not None:  # None: no DP, nothing is charged (the node allows it)
            engine = self.privacy()
            before = engine.ledger.groups()
            engine.charge(
                planned,
                frame,
                keep=SecureMode(spec.secure) is not SecureMode.SECAGG,
                cohort=self.cohort(spec),
            )
            audit_cohorts(self, before, engine.ledger.groups())
        self._keep_state(spec, item.round)

    def _keep_state(self, spec: StudySpec, number: int) -> None:
        """Keep the local training state of a round whose update is charged and leaving: a
        round that never leaves leaves no state for the next to start from."""
        found = self._states.pop((spec.name, number), None)
        if found is None or not found[2]:
            return  # no local part: every tensor is shared
        base, method, state, started_from = found
        keep_state(
            self.store.db,
            self.audit,
            self.name,
            study=spec.name,
            number=number,
            base_version=base,
            method=method,
            state=state,
            started_from=started_from,
            at_rest=self.store.at_rest,
        )

    def privacy(self) -> PrivacyEngine:
        """The site's privacy engine: plans and charges releases against its ledger."""
        return PrivacyEngine(BudgetLedger(self.store.db))

    def cohort(self, spec: StudySpec) -> Cohort:
        """The study's cohort as the ledger records it (keyed hashes, never ids) and its claim;
        hashed once per extraction, not at every release."""
        if spec.name not in self._cohorts:
            matrix = self.features(spec)
            patients = self.store.cohort_hashes(matrix.ids)
            self._cohorts[spec.name] = Cohort(patients, disjoint=spec.privacy.cohort == DISJOINT)
        return self._cohorts[spec.name]

    def _send_again(
        self, spec: StudySpec, number: int, entry: LedgerEntry, frame: bytes | None
    ) -> str:
        """A round offered again after its update left: the same bytes, or a refusal."""
        digest = (entry.digest or "not recorded")[:12]
        if frame is None:
            raise RoundAlreadyReleasedError(
                f"round {number} of study '{spec.name}' was released already (sha256 {digest}) "
                "and its bytes cannot be sent again (a secure round's keys, or a ledger from "
                "before bytes were kept); this node sends nothing new for it"
            )
        self.audit.append(
            "train.resent",
            actor=self.name,
            resource=f"study/{spec.name}",
            details={"round": number, "sha256": entry.digest},
        )
        receipt = self.client.upload(spec.name, number, frame)
        return f"round {number}: sent the same update again ({digest}), round {receipt.round_state}"

    def _local_update(
        self, spec: StudySpec, item: RoundWork, matrix: FeatureMatrix, sigma: float | None
    ) -> TrainResult:
        """Train the global version with the site's local training state (a personalized
        study's local part; `aipipe.node.personal_state`); the shared part's update, clipped.
        The new state waits for the round's charge (`charge_release`) to be kept."""
        method = personalizer_for(spec)
        model = method.build(len(matrix.columns))
        arrays_to_model(self.base_weights(item.version), model)
        kept = None
        if method.local(model):  # a personalized study: the site's own part, from its store
            states = PersonalStates(self.store.db, at_rest=self.store.at_rest)
            kept = states.latest(spec.name, method.name, before=item.round)
        data = SiteData.of(matrix)

        def train(x: np.ndarray, y: np.ndarray) -> TrainResult:
            # The seed drives Poisson sampling and the DP noise: it must be secret and fresh, or
            # anyone who can recompute it can subtract the noise from the update.
            out = method.train_round(
                model,
                {} if kept is None else kept.tensors,
                replace(data, x_fit=x, y_fit=y),
                noise_multiplier=sigma,
                seed=secrets.randbits(63),
            )
            started = None if kept is None else kept.sha256
            self._states[(spec.name, item.round)] = (item.version, method.name, out.state, started)
            return out.result

        if self.attack is not None:  # the test/benchmark harness: `node start --attack` only
            rng = np.random.default_rng(secrets.randbits(63))
            bound = spec.bounds.update_norm
            return self.attack.run(train, matrix.x_train, matrix.y_train, bound, rng)
        result = train(matrix.x_train, matrix.y_train)
        return clip_update(result, spec.bounds.update_norm)  # the hub refuses longer updates

    def signed_header(
        self,
        spec: StudySpec,
        item: RoundWork,
        payload: bytes,
        epsilon: float | None,
        *,
        n: int | None = None,
        norm: float | None = None,
    ) -> UpdateHeader:
        """The update's header bound to this round and payload, signed by this node."""
        plain = SecureMode(spec.secure) is SecureMode.NONE
        header = UpdateHeader(
            node=self.name,
            study=spec.name,
            study_digest=item.study_digest,
            round=item.round,
            base_version=item.version,
            secure=spec.secure,
            num_examples=n,
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            # ε spent is a function of the site's n (through q = batch/n): under secure
            # aggregation it stays on the node with n itself (DESIGN §12).
            epsilon_spent=epsilon if plain else None,
            delta=spec.privacy.delta if epsilon is not None and plain else None,
            train_loss=None,
            update_norm=norm,
            nonce=secrets.token_hex(16),
        )
        signature = self.identity.sign(header.signing_bytes()).hex()
        return header.model_copy(update={"signature": signature})


_KEY_HOLDER_STEPS: dict[str, Callable[[NodeWorker, StudySpec, RoundWork], str]] = {
    "keygen": secure_rounds.ckks_keygen,
    "decrypt": secure_rounds.ckks_decrypt,
}
"""The CKKS key holder's round steps; every other round step trains (`sender_for`)."""


def _hub_reason(spec: StudySpec, exc: Exception) -> str:
    """What a decline tells the hub. A reason may hold the site's counts (patients kept, ε left,
    q = batch/n); under secure aggregation those stay here, in the node's audit log."""
    if SecureMode(spec.secure) is SecureMode.NONE:
        return str(exc)
    return f"{type(exc).__name__} at this node; its audit log holds the reason"
