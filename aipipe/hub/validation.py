"""The hub's validation gate: which model version of a study its CDS may serve.

A study with a `validation:` block and `epsilon > 0` has each site release, per evaluated
version, a DP-noised histogram of (label × predicted-probability bin) counts
(`aipipe.node.validation`). The hub sums the sites' histograms for a version (the sum of the
exact histograms plus the sum of the noise) and computes the pooled AUC, expected calibration
error and observed/expected events from it (`aipipe.study.validation.histogram_report`): post-
processing, free under DP. Its CDS serves the newest version that meets the study's minimum;
with none, no CDS service for the study, and `servable_version` says why (shown by `aipipe
model show` and audited as "cds.withheld").
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import ValidationError

from aipipe.errors import ConflictError
from aipipe.store.hub_store import HubStore
from aipipe.study.spec import StudySpec
from aipipe.study.validation import ValidationReport, histogram_report, judge
from aipipe.wire import EvalReport, SecureMode
from aipipe.wire.messages import CalibrationHistogram


def check_report(spec: StudySpec, report: EvalReport) -> None:
    """Refuse a validation histogram the study did not ask for or that does not fit it."""
    histogram = report.calibration
    if histogram is None:
        return
    criteria = spec.validation
    if criteria is None or criteria.epsilon <= 0 or SecureMode(spec.secure) is not SecureMode.NONE:
        raise ConflictError(f"study '{spec.name}' asks for no validation histogram")
    if histogram.study_digest != spec.digest():
        raise ConflictError(f"the validation histogram is for another version of '{spec.name}'")
    if len(histogram.negatives) != criteria.bins:
        raise ConflictError(
            f"the validation histogram has {len(histogram.negatives)} bins; study "
            f"'{spec.name}' asks for {criteria.bins}"
        )


def site_histograms(store: HubStore, spec: StudySpec, version: str) -> list[CalibrationHistogram]:
    """The sites' noised histograms for `version` that fit the study as published."""
    out, digest = [], spec.digest()
    for report in store.metrics(version).values():
        raw = report.get("calibration")
        if not raw:
            continue
        try:
            histogram = CalibrationHistogram.model_validate(raw)
        except ValidationError:
            continue
        criteria = spec.validation
        if (
            criteria is not None
            and histogram.study_digest == digest
            and len(histogram.negatives) == criteria.bins
        ):
            out.append(histogram)
    return out


def pooled_report(store: HubStore, spec: StudySpec, version: str) -> ValidationReport | None:
    """The pooled validation of `version`, judged by the study; None when no site released
    one (or the study sets no `validation:`)."""
    return _pooled(spec, site_histograms(store, spec, version))


def _pooled(spec: StudySpec, parts: list[CalibrationHistogram]) -> ValidationReport | None:
    criteria = spec.validation
    if criteria is None or not parts:
        return None
    counts = np.sum([[h.negatives, h.positives] for h in parts], axis=0)
    return judge(histogram_report(counts, source="dp", epsilon=criteria.epsilon), criteria)


def validation_card(store: HubStore, version: str) -> dict[str, Any] | None:
    """What a model card or `aipipe model show` shows of `version`'s validation."""
    model = store.model(version)
    study = None if model is None else store.study(model["study"])
    if model is None or study is None:
        return None
    spec = StudySpec.model_validate(json.loads(study["spec"]))
    if spec.validation is None:
        return None
    parts = site_histograms(store, spec, version)
    report = _pooled(spec, parts)
    if report is None:
        return {"source": "dp", "sites": 0, "passed": False, "failures": [_no_release(spec)]}
    return {**report.as_card(), "sites": len(parts)}


def servable_version(
    store: HubStore, spec: StudySpec, current: str | None
) -> tuple[str | None, str]:
    """(the version the hub's CDS may serve, why not the current one): the current version
    when the study sets no `validation:`, else the newest trained version that meets it."""
    if spec.validation is None:
        return current, ""
    reasons: list[str] = []
    for row in sorted(store.models(spec.name), key=lambda r: r["round"], reverse=True):
        if row["round"] == 0:
            continue
        version = str(row["version"])
        report = pooled_report(store, spec, version)
        if report is not None and report.passed:
            return version, "; ".join(reasons)
        why = _no_release(spec) if report is None else "; ".join(report.failures)
        reasons.append(f"version {version[:12]} (round {row['round']}): {why}")
    return None, "; ".join(reasons) or "no trained version yet"


def _no_release(spec: StudySpec) -> str:
    plain = SecureMode(spec.secure) is SecureMode.NONE
    if spec.validation is not None and spec.validation.epsilon > 0 and plain:
        return "no site has released its validation histogram for it yet"
    return (
        "the study releases no validation histograms to the hub (validation.epsilon 0 or "
        "secure aggregation): it is validated and served at the nodes only"
    )
