"""The site's preprocessing statistics for hub-side CDS: released under DP, charged to the site
ledger with their exact bytes before they leave, once per study."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from aipipe.node.site import SiteNode, audit_cohorts, audit_refusal
from aipipe.privacy.errors import PrivacyError
from aipipe.privacy.ledger_records import TRAIN
from aipipe.privacy.statistics import STATISTICS, STATISTICS_ROUND, release
from aipipe.study.features import FeatureMatrix
from aipipe.study.spec import StudySpec
from aipipe.wire import FeatureStats


def report_stats(node: SiteNode, spec: StudySpec, matrix: FeatureMatrix) -> None:
    """Send the site's train statistics for hub CDS, under DP and charged, once per study.

    Only a plaintext DP study whose columns all have a range releases them
    (`StudySpec.statistics_ranges`). They are charged to the site ledger with their exact
    bytes before they leave, and before the study's first round is planned, so that the
    training plan composes them; a study that trained already without them releases none.
    Sent again, they are the same bytes. Refused by the budget, nothing is sent."""
    ranges = spec.statistics_ranges()
    if ranges is None:
        return
    engine = node.privacy()
    ledger = engine.ledger
    released = ledger.released(spec.name, STATISTICS, STATISTICS_ROUND)
    if released is not None:
        if released[1] is not None:
            node.client.report_stats(spec.name, released[1])
        return
    if any(e.kind == TRAIN for e in ledger.entries(spec.name)):
        return  # trained already: the plan did not count them, so they stay here
    try:
        plan = engine.plan_statistics(spec)
        body = _stats_body(spec, matrix, ranges, plan.noise_multiplier)
        before = ledger.groups()
        engine.charge(plan, body, cohort=node.cohort(spec))
    except PrivacyError as exc:
        audit_refusal(node, STATISTICS, spec, STATISTICS_ROUND, exc)
        return
    audit_cohorts(node, before, ledger.groups())
    node.client.report_stats(spec.name, body)


def _stats_body(
    spec: StudySpec, matrix: FeatureMatrix, ranges: list[tuple[float, float]], z: float
) -> bytes:
    """The JSON bytes of the site's noised statistics (drawn once: the ledger keeps them)."""
    sums = release(_unstandardized(matrix), ranges, multiplier=z, max_rows=spec.bounds.max_examples)
    stats = FeatureStats(study_digest=spec.digest(), n=sums.n, sums=sums.sums, squares=sums.squares)
    return stats.model_dump_json().encode()


def _unstandardized(matrix: FeatureMatrix) -> NDArray[np.float64]:
    """The filled train rows in the columns' own units (the matrix holds them z-scored)."""
    prep, x = matrix.preprocessor, matrix.x_train.astype(np.float64)
    if prep.mean is None or prep.std is None:
        return x
    return x * (prep.std + 1e-9) + prep.mean
