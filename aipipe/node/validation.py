"""A node's validation gate: a model version is served here only if it meets the study's minimum.

The node evaluates a version on its own held-out (test) split, lineage-verified exactly as the
hub's `evaluate` work item is (`aipipe.node.lineage`), and keeps the exact report with its other
local evaluations; those numbers never leave the node. `node serve-cds` and `node predict`
(write-back included) call `require_servable` first: it serves the newest version of the current
version's verified lineage (the current one, else the base this node trained its round from,
and so on, at most `MAX_VERSIONS_TRIED`) that meets the study's `validation:` minimum here, and
refuses, naming each version tried with the metric, its value and the gap, when none does. Either
way it is audited (the version served, those passed over and why). Falling back charges nothing
and asks the hub for nothing: the earlier versions are those this node evaluated, whose weights
it kept then (`aipipe.node.kept_versions`) with their report, so the hub sees the same requests
whether the current version passes here or not.

What may leave for the hub's gate is `release_histogram`: the (label × predicted-probability
bin) counts of the test split with Gaussian noise. Adding or removing one patient moves one
cell by 1, so the L2 sensitivity is 1 and σ = z with z the noise multiplier of one unsampled
Gaussian step at the study's `validation.epsilon` (`aipipe.privacy.statistics`). The release is
charged to the site ledger (kind "validation", the version's round) with its exact bytes, in
one transaction, before it is sent; offered again, the same bytes are sent.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError, NotFoundError
from aipipe.models import arrays_to_model
from aipipe.models.errors import UnverifiedModelError
from aipipe.models.training import evaluate
from aipipe.node.client import HubClient
from aipipe.node.kept_versions import KEPT_PER_STUDY, KeptVersions
from aipipe.node.lineage import LocalEvaluation, ModelLineage
from aipipe.personalization import personalizer_for
from aipipe.privacy.cohorts import Cohort
from aipipe.privacy.engine import VALIDATION, PrivacyEngine
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix, extract
from aipipe.study.spec import StudySpec
from aipipe.study.validation import (
    ModelQualityError,
    ValidationReport,
    exact_report,
    from_card,
    histogram,
    judge,
)
from aipipe.wire.messages import CalibrationHistogram
from aipipe.wire.tensors import decode_arrays

DEFAULT_BINS = 10
# The gate tries the current version and at most this many less one earlier versions of its
# lineage, as many as a node keeps per study.
MAX_VERSIONS_TRIED = KEPT_PER_STUDY


@dataclass(frozen=True)
class Assessment:
    """A version's exact report on the test split, with what it was computed from."""

    report: ValidationReport
    labels: NDArray[np.float64]
    probabilities: NDArray[np.float64]


def probabilities(model: nn.Module, x: NDArray[np.floating]) -> NDArray[np.float64]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(x), dtype=torch.float32)).squeeze(1)
    return torch.sigmoid(logits).double().numpy()


def assess(spec: StudySpec, model: nn.Module, matrix: FeatureMatrix) -> Assessment:
    """The exact report of `model` on the node's test split, judged by the study's minimum."""
    bins = spec.validation.bins if spec.validation is not None else DEFAULT_BINS
    labels = np.asarray(matrix.y_test, np.float64)
    probs = probabilities(model, matrix.x_test)
    report = exact_report(labels, probs, bins)
    if spec.validation is not None:
        report = judge(report, spec.validation)
    return Assessment(report, labels, probs)


def release_histogram(
    engine: PrivacyEngine, spec: StudySpec, number: int, assessment: Assessment, cohort: Cohort
) -> CalibrationHistogram | None:
    """The noised histogram for the hub, charged before it leaves; None when the study asks
    for none (no `validation.epsilon`, or secure aggregation: the hub learns no site's n).
    Raises `BudgetExhaustedError` (nothing charged, nothing to send) when it does not fit."""
    criteria, plan = spec.validation, engine.plan_validation(spec, number)
    if criteria is None or plan is None:
        return None
    released = engine.ledger.released(spec.name, VALIDATION, number)
    if released is not None:
        frame = released[1]
        return None if frame is None else CalibrationHistogram.model_validate_json(frame)
    exact = histogram(assessment.labels, assessment.probabilities, criteria.bins)
    rng = np.random.default_rng(secrets.randbits(128))  # secret and fresh, or it can be undone
    noised = exact + rng.normal(0.0, plan.noise_multiplier, size=exact.shape)
    body = CalibrationHistogram(
        study_digest=spec.digest(),
        negatives=[float(v) for v in noised[0]],
        positives=[float(v) for v in noised[1]],
        epsilon=criteria.epsilon,
        delta=spec.privacy.delta,
    ).model_dump_json()
    engine.charge(plan, body.encode(), cohort=cohort)
    return CalibrationHistogram.model_validate_json(body)


@dataclass(frozen=True)
class Tried:
    """A version the gate tried and did not serve: its round (None when unknown) and why
    (the metrics it misses here, or why this node cannot verify it)."""

    version: str
    round: int | None
    failures: list[str]
    verified: bool = True

    def describe(self) -> str:
        where = "" if self.round is None else f" (round {self.round})"
        return f"model {self.version[:12]}{where}: {'; '.join(self.failures)}"

    def as_details(self) -> dict[str, Any]:
        return {"version": self.version, "round": self.round, "failures": list(self.failures)}


@dataclass(frozen=True)
class Served:
    """What the gate serves: `version`, its encoded `weights`, its report here (None when the
    study sets no minimum), the study's `current` version and the newer versions passed over
    (newest first; empty when the current one is served)."""

    version: str
    weights: bytes
    report: ValidationReport | None
    current: str
    passed_over: list[Tried] = field(default_factory=list)

    @property
    def older_than_current(self) -> bool:
        return self.version != self.current


def serve_current(
    store: NodeStore, client: HubClient, spec: StudySpec, *, audit: AuditLog, actor: str, use: str
) -> Served:
    """`require_servable` from the study's current version at the hub (ConfigError when the
    study has no model yet)."""
    version = client.study(spec.name).current_version
    if version is None:
        raise ConfigError(f"study '{spec.name}' has no model yet")
    weights = client.model_weights(version)
    return require_servable(store, client, spec, version, weights, audit=audit, actor=actor,
                            use=use)  # fmt: skip


def require_servable(
    store: NodeStore,
    client: HubClient,
    spec: StudySpec,
    version: str,
    weights: bytes,
    *,
    audit: AuditLog,
    actor: str,
    use: str,
    features: Callable[[StudySpec], FeatureMatrix] | None = None,
) -> Served:
    """The newest version of `version`'s lineage (itself first, then the base this node
    trained its round from, and so on; at most `MAX_VERSIONS_TRIED`) that meets the study's
    `validation:` minimum on this node's test split; `version` itself when the study sets none.
    `ModelQualityError` naming each version tried when none does. One `validation` audit event
    either way: the version served and those passed over, with their metrics.

    `version` is verified as the `evaluate` work item verifies one (`aipipe.node.lineage`: a
    round this node took part in, the result the hub names for it, its weights' content
    address, the pinned result) before it is judged: by its kept exact report when this node
    has evaluated it, else by evaluating it now (on `features(spec)`, default a fresh extraction
    from the store); its weights are then kept. An earlier version is judged only from what
    this node holds, without a request to the hub (which would tell it that the current version
    fails here): its round from this node's pinned results, its weights as kept when it was
    evaluated, checked against their address (`aipipe.node.kept_versions`), its kept report.
    One whose weights are not kept here is skipped (its round and base are this node's own
    record, so the walk goes on past it); one whose round this node never pinned (the initial
    model, or a result it never evaluated) ends the walk: its place is only the hub's word.
    Nothing leaves the node: the exact numbers stay in `local_evaluations` and the audit log,
    and nothing is charged to the privacy ledger."""
    if spec.validation is None:
        return Served(version, weights, None, version)
    lineage, kept = ModelLineage(store.db), KeptVersions(store)
    matrix = features or (lambda study: extract(store, study))
    tried: list[Tried] = []
    candidate: str | None = version
    while candidate is not None and len(tried) < MAX_VERSIONS_TRIED:
        if tried:
            step = _judge_kept(spec, candidate, lineage, kept, matrix)
        else:
            step = _judge(client, spec, candidate, weights, lineage, kept, matrix)
        if isinstance(step, Served):
            served = dataclasses.replace(step, current=version, passed_over=tried)
            _audit(audit, actor, spec, use, served, tried)
            return served
        if step is None:  # an earlier version this node never verified: not a candidate
            break
        tried.append(step[0])
        candidate = step[1]
    _audit(audit, actor, spec, use, None, tried, current=version)
    raise _refusal(spec, tried)


def _judge(
    client: HubClient,
    spec: StudySpec,
    version: str,
    raw: bytes,
    lineage: ModelLineage,
    kept: KeptVersions,
    features: Callable[[StudySpec], FeatureMatrix],
) -> Served | tuple[Tried, str | None]:
    """The current `version` served, or (why not, the next version to try): verified with
    the hub's round record whether it passes here or not; its weights then kept here."""
    assert spec.validation is not None
    evaluated = lineage.evaluation(spec.name, version)
    number: int | None = None
    try:
        number = evaluated.round if evaluated is not None else int(client.model(version)["round"])
        base = str(lineage.require_round(spec.name, number, version)["base_version"])
        announced = client.round(spec.name, number).result_version
        lineage.verify(spec.name, number, version, announced, raw)
    except (UnverifiedModelError, NotFoundError) as exc:
        why = f"this node cannot validate it on its own held-out patients ({exc})"
        return Tried(version, number, [why], verified=False), None
    report = _report(spec, version, number, raw, lineage, features)
    kept.keep(spec.name, number, version, raw)
    if report.passed:
        return Served(version, raw, report, version)
    return Tried(version, number, report.failures), base


def _judge_kept(
    spec: StudySpec,
    version: str,
    lineage: ModelLineage,
    kept: KeptVersions,
    features: Callable[[StudySpec], FeatureMatrix],
) -> Served | tuple[Tried, str | None] | None:
    """An earlier `version` served, or (why not, the next version to try), from what this
    node holds only; None when this node never pinned it as one of its rounds' results."""
    number = lineage.pinned_round(spec.name, version)
    if number is None:
        return None
    base = str(lineage.require_round(spec.name, number, version)["base_version"])
    try:
        held = kept.get(spec.name, version, lineage)
    except UnverifiedModelError as exc:
        return Tried(version, number, [f"not served: {exc}"], verified=False), base
    if held is None:
        why = "its weights are not kept on this node (the hub is not asked for them); skipped"
        return Tried(version, number, [why], verified=False), base
    report = _report(spec, version, number, held.weights, lineage, features)
    if report.passed:
        return Served(version, held.weights, report, version)
    return Tried(version, number, report.failures), base


def _report(
    spec: StudySpec,
    version: str,
    number: int,
    weights: bytes,
    lineage: ModelLineage,
    features: Callable[[StudySpec], FeatureMatrix],
) -> ValidationReport:
    """A verified `version`'s report here: its kept one, else evaluated now (and kept)."""
    assert spec.validation is not None
    evaluated = lineage.evaluation(spec.name, version)
    if evaluated is not None and evaluated.validation is not None:
        return judge(from_card(evaluated.validation), spec.validation)
    return _evaluate_now(spec, version, number, weights, lineage, features)


def _evaluate_now(
    spec: StudySpec,
    version: str,
    number: int,
    weights: bytes,
    lineage: ModelLineage,
    features: Callable[[StudySpec], FeatureMatrix],
) -> ValidationReport:
    """Evaluate a verified `version` on the test split and keep its exact report here."""
    matrix = features(spec)
    built = personalizer_for(spec).build(len(matrix.columns))  # the method's architecture
    model = arrays_to_model(decode_arrays(weights), built)
    assessment = assess(spec, model, matrix)
    result = evaluate(model, matrix.x_test, matrix.y_test)
    card = assessment.report.as_card()
    lineage.save(LocalEvaluation(spec.name, version, number, **result.__dict__, validation=card))
    return assessment.report


def _refusal(spec: StudySpec, tried: list[Tried]) -> ModelQualityError:
    if len(tried) == 1 and not tried[0].verified:
        return ModelQualityError(
            f"model {tried[0].version[:12]} of study '{spec.name}' is not served by this node: "
            f"it cannot validate it on its own held-out patients ({tried[0].failures[0]})"
        )
    if len(tried) == 1:
        return ModelQualityError(
            f"model {tried[0].version[:12]} of study '{spec.name}' is not served: on this "
            f"node's held-out patients it misses the study's validation minimum: "
            f"{'; '.join(tried[0].failures)}. Train further or revise the study"
        )
    return ModelQualityError(
        f"no model version of study '{spec.name}' is served by this node: neither the current "
        f"version nor an earlier one of its lineage (the last {MAX_VERSIONS_TRIED} at most) "
        f"meets the study's validation minimum on its held-out patients: "
        f"{'; '.join(t.describe() for t in tried)}. Train further or revise the study"
    )


def _audit(
    audit: AuditLog,
    actor: str,
    spec: StudySpec,
    use: str,
    served: Served | None,
    tried: list[Tried],
    *,
    current: str = "",
) -> None:
    """The gate's event: versions, rounds and metric failures only (no patient data)."""
    details: dict[str, Any] = {"study": spec.name, "use": use}
    if served is not None:
        details.update(failures=[], served=served.version, current=served.current,
                       passed_over=[t.as_details() for t in tried])  # fmt: skip
    else:
        details.update(failures=tried[0].failures if tried else [], served=None,
                       current=current, tried=[t.as_details() for t in tried])  # fmt: skip
    audit.append(
        "validation",
        actor=actor,
        resource=f"model/{current if served is None else served.version}",
        outcome="refused" if served is None else "success",
        details=details,
    )
