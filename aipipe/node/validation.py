"""A node's validation gate: a model version is served here only if it meets the study's minimum.

The node evaluates a version on its own held-out (test) split, lineage-verified exactly as the
hub's `evaluate` work item is (`aipipe.node.lineage`), and keeps the exact report with its other
local evaluations; those numbers never leave the node. `node serve-cds` and `node predict`
(write-back included) call `require_servable` first: a version that misses the study's
`validation:` minimum is refused with the metric, its value and the gap, and the refusal is
audited.

What may leave for the hub's gate is `release_histogram`: the (label × predicted-probability
bin) counts of the test split with Gaussian noise. Adding or removing one patient moves one
cell by 1, so the L2 sensitivity is 1 and σ = z with z the noise multiplier of one unsampled
Gaussian step at the study's `validation.epsilon` (`aipipe.privacy.statistics`). The release is
charged to the site ledger (kind "validation", the version's round) with its exact bytes, in
one transaction, before it is sent; offered again, the same bytes are sent.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from aipipe.audit.log import AuditLog
from aipipe.errors import NotFoundError
from aipipe.models import arrays_to_model
from aipipe.models.errors import UnverifiedModelError
from aipipe.models.training import evaluate
from aipipe.node.client import HubClient
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
) -> ValidationReport | None:
    """The node's report of `version` if it meets the study's `validation:` minimum (None when
    the study sets none); `ModelQualityError`, audited, when it does not or cannot be checked.
    Evaluates the version now (lineage-verified) on `features(spec)`'s test split (default: a
    fresh extraction from the store) if this node has not yet."""
    if spec.validation is None:
        return None
    lineage = ModelLineage(store.db)
    kept = lineage.evaluation(spec.name, version)
    try:
        if kept is not None and kept.validation is not None:
            report = judge(from_card(kept.validation), spec.validation)
        else:
            matrix = features or (lambda study: extract(store, study))
            report = _evaluate_now(client, spec, version, weights, lineage, matrix)
    except (UnverifiedModelError, NotFoundError) as exc:
        error = ModelQualityError(
            f"model {version[:12]} of study '{spec.name}' is not served by this node: it "
            f"cannot validate it on its own held-out patients ({exc})"
        )
        _audit(audit, actor, spec, version, use, [str(exc)])
        raise error from exc
    _audit(audit, actor, spec, version, use, report.failures)
    if not report.passed:
        raise ModelQualityError(
            f"model {version[:12]} of study '{spec.name}' is not served: on this node's "
            f"held-out patients it misses the study's validation minimum: "
            f"{'; '.join(report.failures)}. Train further or revise the study"
        )
    return report


def _evaluate_now(
    client: HubClient,
    spec: StudySpec,
    version: str,
    weights: bytes,
    lineage: ModelLineage,
    features: Callable[[StudySpec], FeatureMatrix],
) -> ValidationReport:
    """Verify `version`'s lineage as the evaluate work item does, evaluate it and keep it."""
    number = int(client.model(version)["round"])
    lineage.require_round(spec.name, number, version)
    announced = client.round(spec.name, number).result_version
    lineage.verify(spec.name, number, version, announced, weights)
    matrix = features(spec)
    built = personalizer_for(spec).build(len(matrix.columns))  # the method's architecture
    model = arrays_to_model(decode_arrays(weights), built)
    assessment = assess(spec, model, matrix)
    result = evaluate(model, matrix.x_test, matrix.y_test)
    card = assessment.report.as_card()
    lineage.save(LocalEvaluation(spec.name, version, number, **result.__dict__, validation=card))
    return assessment.report


def _audit(
    audit: AuditLog, actor: str, spec: StudySpec, version: str, use: str, failures: list[str]
) -> None:
    audit.append(
        "validation",
        actor=actor,
        resource=f"model/{version}",
        outcome="refused" if failures else "success",
        details={"study": spec.name, "use": use, "failures": failures},
    )
