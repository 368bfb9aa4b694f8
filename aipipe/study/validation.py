"""Validation metrics a model version must reach before it is served (the study's `validation:`).

Pure numpy, the same code at the node (exact, on its own held-out split; the numbers never
leave it) and at the hub (from the sites' DP-noised histograms, summed):

* **AUC**: the Mann-Whitney probability that a positive scores above a negative (ties ½). From
  a histogram, patients in one probability bin count as tied (the binned AUC, a little below
  the exact one for a model that ranks well inside a bin).
* **Expected calibration error (ECE)**: over `bins` equal-width probability bins,
  Σ_b (n_b / N)·|mean predicted_b − observed rate_b|. From a histogram the predicted mean of a
  bin is its midpoint (off by at most half a bin width).
* **Calibration-in-the-large**: observed / expected events, Σy / Σp (1 is perfect).
* **Calibration slope** (exact only): the slope of the logistic regression of y on logit(p)
  (1 is perfect; below 1 the predictions are too extreme; negative means inverted).

`ValidationReport.failures` says which of the study's minimums a report misses, and by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import roc_auc_score

from aipipe.errors import StudyError
from aipipe.study.blocks import Validation

Source = Literal["exact", "dp"]
_EPS = 1e-12


class ModelQualityError(StudyError):
    """A model version misses the study's validation minimum, so it is not served."""


@dataclass(frozen=True)
class CalibrationBin:
    lo: float
    hi: float
    n: float
    predicted: float | None  # mean predicted probability (the midpoint from a histogram)
    observed: float | None  # observed event rate; None for an empty bin


@dataclass(frozen=True)
class ValidationReport:
    n: float
    positives: float
    auc: float | None
    calibration_error: float | None
    observed_expected: float | None
    slope: float | None
    bins: list[CalibrationBin]
    source: Source = "exact"
    epsilon: float | None = None  # of each site's release, for a DP report
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_card(self) -> dict[str, Any]:
        """The report for a model card: metrics, n, bins, whether it passed, DP or exact."""
        return {
            "source": self.source,
            "epsilon": self.epsilon,
            "n": _round(self.n),
            "positives": _round(self.positives),
            "auc": _round(self.auc),
            "calibration_error": _round(self.calibration_error),
            "observed_expected": _round(self.observed_expected),
            "calibration_slope": _round(self.slope),
            "bins": [
                {
                    "range": [b.lo, b.hi],
                    "n": _round(b.n),
                    "predicted": _round(b.predicted),
                    "observed": _round(b.observed),
                }
                for b in self.bins
            ],
            "passed": self.passed,
            "failures": list(self.failures),
        }

    def with_failures(self, failures: list[str]) -> ValidationReport:
        return ValidationReport(**{**self.__dict__, "failures": failures})


def edges(bins: int) -> NDArray[np.float64]:
    return np.linspace(0.0, 1.0, bins + 1)


def bin_index(p: NDArray[np.float64], bins: int) -> NDArray[np.int64]:
    """Each probability's bin: [0, 1/B), …, [(B−1)/B, 1] (1 falls in the last bin)."""
    return np.clip((np.asarray(p, np.float64) * bins).astype(np.int64), 0, bins - 1)


def histogram(y: ArrayLike, p: ArrayLike, bins: int) -> NDArray[np.float64]:
    """Counts of shape (2, bins): row 0 the negatives, row 1 the positives, per predicted bin.
    One patient is in exactly one cell (L2 sensitivity 1 under adding or removing a patient)."""
    labels, probs = _arrays(y, p)
    out = np.zeros((2, bins), np.float64)
    np.add.at(out, (labels.astype(np.int64), bin_index(probs, bins)), 1.0)
    return out


def exact_report(y: ArrayLike, p: ArrayLike, bins: int) -> ValidationReport:
    """Metrics of predicted probabilities `p` against labels `y` (0/1), on exact data."""
    labels, probs = _arrays(y, p)
    index = bin_index(probs, bins)
    lo = edges(bins)
    table: list[CalibrationBin] = []
    ece = 0.0
    for b in range(bins):
        mask = index == b
        k = int(mask.sum())
        predicted = float(probs[mask].mean()) if k else None
        observed = float(labels[mask].mean()) if k else None
        if k and predicted is not None and observed is not None:
            ece += k / len(labels) * abs(predicted - observed)
        table.append(CalibrationBin(float(lo[b]), float(lo[b + 1]), k, predicted, observed))
    n, positives = float(len(labels)), float(labels.sum())
    return ValidationReport(
        n=n,
        positives=positives,
        auc=_auc(labels, probs),
        calibration_error=ece if len(labels) else None,
        observed_expected=positives / float(probs.sum()) if probs.sum() > _EPS else None,
        slope=calibration_slope(labels, probs),
        bins=table,
    )


def histogram_report(
    counts: ArrayLike, *, source: Source = "dp", epsilon: float | None = None
) -> ValidationReport:
    """Metrics from a (2, bins) histogram, e.g. the sum of the sites' noised ones. Noised
    counts below 0 are read as 0 (post-processing); the bin midpoint stands for its mean."""
    h = np.clip(np.asarray(counts, np.float64), 0.0, None)
    bins = h.shape[1]
    lo, mid = edges(bins), (edges(bins)[:-1] + edges(bins)[1:]) / 2
    neg, pos = h[0], h[1]
    per_bin = neg + pos
    n, positives = float(per_bin.sum()), float(pos.sum())
    table = [
        CalibrationBin(float(lo[b]), float(lo[b + 1]), float(per_bin[b]), float(mid[b]),
                       float(pos[b] / per_bin[b]) if per_bin[b] > 0 else None)
        for b in range(bins)
    ]  # fmt: skip
    ece = sum(
        per_bin[b] / n * abs(mid[b] - pos[b] / per_bin[b]) for b in range(bins) if per_bin[b] > 0
    )
    expected = float((per_bin * mid).sum())
    return ValidationReport(
        n=n,
        positives=positives,
        auc=_binned_auc(neg, pos),
        calibration_error=float(ece) if n > 0 else None,
        observed_expected=positives / expected if expected > _EPS else None,
        slope=None,
        bins=table,
        source=source,
        epsilon=epsilon,
    )


def failures(
    report: ValidationReport,
    *,
    min_auc: float | None,
    max_calibration_error: float | None,
    observed_expected: tuple[float, float] | None,
    min_patients: int,
) -> list[str]:
    """What the report misses of the study's minimum, each with the value, the bound and the
    gap; an empty list when it meets them all."""
    out: list[str] = []
    if report.n < min_patients:
        out.append(
            f"validated on {report.n:.0f} patients, fewer than the study's min_patients "
            f"{min_patients} (short by {min_patients - report.n:.0f})"
        )
    if min_auc is not None:
        if report.auc is None:
            out.append("AUC cannot be computed (the held-out patients hold one class only)")
        elif report.auc < min_auc:
            out.append(
                f"AUC {report.auc:.3f} is below the study's min_auc {min_auc:.3f} "
                f"(short by {min_auc - report.auc:.3f})"
            )
    ece = report.calibration_error
    if max_calibration_error is not None and (ece is None or ece > max_calibration_error):
        shown = "cannot be computed" if ece is None else f"{ece:.3f}"
        over = "" if ece is None else f" (over by {ece - max_calibration_error:.3f})"
        out.append(
            f"calibration error (ECE) {shown} is above the study's max_calibration_error "
            f"{max_calibration_error:.3f}{over}"
        )
    oe = report.observed_expected
    if observed_expected is not None and (
        oe is None or not observed_expected[0] <= oe <= observed_expected[1]
    ):
        shown = "cannot be computed" if oe is None else f"{oe:.3f}"
        out.append(
            f"observed/expected events {shown} is outside the study's observed_expected "
            f"[{observed_expected[0]:.2f}, {observed_expected[1]:.2f}]"
        )
    return out


def judge(report: ValidationReport, criteria: Validation) -> ValidationReport:
    """The report with what it misses of the study's `validation:` block."""
    return report.with_failures(
        failures(
            report,
            min_auc=criteria.min_auc,
            max_calibration_error=criteria.max_calibration_error,
            observed_expected=criteria.observed_expected,
            min_patients=criteria.min_patients,
        )
    )


def from_card(card: dict[str, Any]) -> ValidationReport:
    """A report back from its `as_card()` form (as a node keeps it)."""
    bins = [
        CalibrationBin(b["range"][0], b["range"][1], b["n"], b["predicted"], b["observed"])
        for b in card["bins"]
    ]
    return ValidationReport(
        n=card["n"],
        positives=card["positives"],
        auc=card["auc"],
        calibration_error=card["calibration_error"],
        observed_expected=card["observed_expected"],
        slope=card["calibration_slope"],
        bins=bins,
        source=card["source"],
        epsilon=card["epsilon"],
        failures=list(card.get("failures", [])),
    )


def calibration_slope(y: NDArray[np.float64], p: NDArray[np.float64]) -> float | None:
    """Slope of logit P(y) = a + b·logit(p), fitted by Newton's method (None if it cannot be:
    one class only, constant predictions, or no convergence)."""
    if len(y) < 3 or y.min() == y.max():
        return None
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1 - 1e-6))
    if float(z.std()) < 1e-9:
        return None
    x = np.stack([np.ones_like(z), z], axis=1)
    beta = np.zeros(2)
    for _ in range(50):
        mu = 1 / (1 + np.exp(-(x @ beta)))
        w = mu * (1 - mu) + 1e-9
        hessian = x.T @ (x * w[:, None])
        try:
            step = np.linalg.solve(hessian, x.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if not np.all(np.isfinite(beta)) or np.abs(beta).max() > 1e6:
            return None  # separable data: the slope runs off to infinity
        if np.abs(step).max() < 1e-10:
            return float(beta[1])
    return None


def _auc(y: NDArray[np.float64], p: NDArray[np.float64]) -> float | None:
    """ROC AUC (ties count ½: scikit-learn's); None with one class only (or none)."""
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


def _binned_auc(neg: NDArray[np.float64], pos: NDArray[np.float64]) -> float | None:
    """P(positive's bin > negative's bin) + ½·P(same bin), from counts per bin."""
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= _EPS or total_neg <= _EPS:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
    wins = float((pos * (below + neg / 2)).sum())
    return min(max(wins / (total_pos * total_neg), 0.0), 1.0)


def _arrays(y: ArrayLike, p: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    labels = np.asarray(y, np.float64).reshape(-1)
    probs = np.clip(np.asarray(p, np.float64).reshape(-1), 0.0, 1.0)
    if labels.shape != probs.shape:
        raise ValueError(f"{len(labels)} labels but {len(probs)} predictions")
    return labels, probs


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)
