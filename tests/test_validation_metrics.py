"""Issue 11 item 9: the validation metrics a study's `validation:` block gates serving on.

Hand-computed cases for AUC, expected calibration error (ECE) and observed/expected events,
exact and from a (label × bin) histogram, and the study block itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aipipe.errors import StudyError
from aipipe.study.spec import StudySpec, parse_study
from aipipe.study.validation import (
    exact_report,
    failures,
    histogram,
    histogram_report,
    judge,
)
from tests.hub_support import STUDY

# Four patients: negatives at 0.1 and 0.4, positives at 0.35 and 0.8 (bins 1, 4, 3, 8 of 10).
Y = [0, 0, 1, 1]
P = [0.1, 0.4, 0.35, 0.8]


def test_exact_metrics_match_the_hand_computed_values() -> None:
    report = exact_report(Y, P, bins=10)
    # AUC: of the 4 (positive, negative) pairs, only (0.35, 0.4) is ranked wrong → 3/4.
    assert report.auc == pytest.approx(0.75)
    # ECE: each occupied bin holds one patient: (0.1 + 0.4 + 0.65 + 0.2) / 4.
    assert report.calibration_error == pytest.approx(1.35 / 4)
    # Observed / expected events: 2 / (0.1 + 0.4 + 0.35 + 0.8).
    assert report.observed_expected == pytest.approx(2 / 1.65)
    assert (report.n, report.positives, report.source) == (4, 2, "exact")
    occupied = [(b.lo, b.n, b.observed) for b in report.bins if b.n]
    assert occupied == [(0.1, 1, 0.0), (0.30000000000000004, 1, 1.0), (0.4, 1, 0.0),
                        (0.8, 1, 1.0)]  # fmt: skip


def test_histogram_metrics_use_bin_midpoints_and_count_a_shared_bin_as_a_tie() -> None:
    counts = histogram(Y, P, bins=10)
    assert counts[0].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    assert counts[1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    report = histogram_report(counts, epsilon=1.0)
    assert report.auc == pytest.approx(0.75)
    # midpoints 0.15, 0.45, 0.35, 0.85: (0.15 + 0.45 + 0.65 + 0.15) / 4
    assert report.calibration_error == pytest.approx(1.4 / 4)
    assert report.observed_expected == pytest.approx(2 / 1.8)
    assert (report.source, report.epsilon) == ("dp", 1.0)
    # a positive and a negative in one bin are a tie: AUC ½
    assert histogram_report(histogram([0, 1], [0.52, 0.58], bins=10)).auc == pytest.approx(0.5)


def test_ties_count_half_and_one_class_gives_no_auc() -> None:
    assert exact_report([0, 1], [0.5, 0.5], bins=10).auc == pytest.approx(0.5)
    assert exact_report([1, 1, 1], [0.2, 0.5, 0.9], bins=10).auc is None
    assert histogram_report(np.zeros((2, 10))).auc is None


def test_a_probability_of_one_falls_in_the_last_bin() -> None:
    assert histogram([1], [1.0], bins=4)[1].tolist() == [0, 0, 0, 1]


def test_negative_noised_counts_are_read_as_zero() -> None:
    counts = np.array([[5.0, -2.0], [-1.0, 7.0]])
    report = histogram_report(counts)
    assert report.n == 12 and report.auc == pytest.approx(1.0)


def test_calibration_slope_is_one_for_a_calibrated_model_and_negative_for_an_inverted_one() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 20_000)
    y = (rng.random(20_000) < p).astype(float)
    calibrated = exact_report(y, p, bins=10)
    assert calibrated.slope == pytest.approx(1.0, abs=0.08)
    assert calibrated.calibration_error is not None and calibrated.calibration_error < 0.03
    inverted = exact_report(y, 1 - p, bins=10)
    assert inverted.slope == pytest.approx(-1.0, abs=0.08)
    assert inverted.auc is not None and inverted.auc < 0.3


def test_failures_name_the_metric_its_value_the_minimum_and_the_gap() -> None:
    report = exact_report(Y, P, bins=10)
    found = failures(report, min_auc=0.8, max_calibration_error=0.1,
                     observed_expected=(0.8, 1.2), min_patients=50)  # fmt: skip
    assert found == [
        "validated on 4 patients, fewer than the study's min_patients 50 (short by 46)",
        "AUC 0.750 is below the study's min_auc 0.800 (short by 0.050)",
        "calibration error (ECE) 0.337 is above the study's max_calibration_error 0.100 "
        "(over by 0.237)",
        "observed/expected events 1.212 is outside the study's observed_expected [0.80, 1.20]",
    ]
    assert failures(report, min_auc=0.7, max_calibration_error=0.4,
                    observed_expected=None, min_patients=4) == []  # fmt: skip


def _spec(**extra: Any) -> StudySpec:
    return StudySpec.model_validate({**STUDY, **extra})


def test_a_study_without_validation_keeps_its_digest() -> None:
    # The digest of tests.hub_support.STUDY before `validation:` existed.
    assert _spec().digest() == "a531823fd94dd3c35aa1d25a122a184b58be08304cd237ffb6a77e377af51d6b"
    assert _spec(validation={"min_auc": 0.7}).digest() != _spec().digest()


def test_the_study_block_is_read_and_judges_a_report() -> None:
    spec = _spec(validation={"min_auc": 0.8, "max_calibration_error": 0.5, "min_patients": 2})
    assert spec.validation is not None and spec.validation.bins == 10
    judged = judge(exact_report(Y, P, bins=10), spec.validation)
    assert not judged.passed and judged.failures[0].startswith("AUC 0.750")
    card = judged.as_card()
    assert card["passed"] is False and card["source"] == "exact" and len(card["bins"]) == 10
    assert card["auc"] == 0.75 and card["n"] == 4


@pytest.mark.parametrize(
    "block", [{"min_auc": 1.5}, {"observed_expected": [1.2, 0.8]}, {"bins": 1}, {"nope": 1}]
)
def test_a_malformed_validation_block_is_refused(block: dict[str, Any]) -> None:
    import yaml

    with pytest.raises(StudyError, match="validation"):
        parse_study(yaml.safe_dump({**STUDY, "validation": block}))
