"""Score a node's cohort with the study's current model and, optionally, write the scores back
to the EHR as FHIR R4 RiskAssessments.

Scoring reuses the CDS scorer (one code path from resources to probability) with the site's own
train preprocessing. Patients are scored as of now (or an explicit `as_of` day), not as of the
study's training `reference_date`: every Observation dated on or before the as-of day counts and
age is taken in the as-of year. The RiskAssessment's `occurrenceDateTime` is that as-of time and
its `basis` the Observations the features read. Each RiskAssessment carries the identifier of
`assessment_identifier` (study, patient), the same one a CDS card's suggestion carries, so a
re-run, or a write-back after the EHR accepted a card, updates the same resource.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from aipipe.cds import ModelSource, PatientScorer, build_risk_assessment, risk_level
from aipipe.cds.cards import IDENTIFIER_SYSTEM, assessment_identifier
from aipipe.errors import StudyError
from aipipe.fhir.server import FhirServerSource
from aipipe.store.node_store import NodeStore
from aipipe.study.cds import CdsSettings
from aipipe.study.features import site_preprocessor
from aipipe.study.spec import StudySpec

__all__ = ["Prediction", "assessment_identifier", "predict_cohort", "write_back"]


@dataclass(frozen=True)
class Prediction:
    patient_id: str
    pseudonym: str
    probability: float | None
    level: str | None
    missing: tuple[str, ...]
    assessment: dict[str, Any] | None
    reasons: tuple[str, ...] = ()  # why not scored: outside the population, unscalable inputs


def predict_cohort(
    store: NodeStore,
    spec: StudySpec,
    weights: Mapping[str, np.ndarray],
    version: str,
    *,
    now: datetime,
    as_of: date | None = None,
    settings: CdsSettings | None = None,
) -> list[Prediction]:
    """Score every patient of the store as of `as_of` (a day; None: `now`), worded and graded by
    the study's `cds:` block unless `settings` are given; a patient missing a
    required feature, or outside the study's population, is not scored (`reasons` says why).
    Raises `StudyError` when this site cannot scale the model's inputs at all (too few train
    patients). The site's train preprocessing stays the study's own."""
    chosen = settings or spec.cds_settings()
    occurrence: date | datetime = now if as_of is None else as_of
    cutoff = (now.astimezone(UTC) if now.tzinfo else now).date() if as_of is None else as_of
    preprocessor = site_preprocessor(store, spec)
    if preprocessor.problems():
        raise StudyError(f"study '{spec.name}': {'; '.join(preprocessor.problems())}")
    scorer = PatientScorer(spec, weights, preprocessor, version)
    source = ModelSource.for_study(spec, version, chosen)
    out = []
    for (pid,) in list(store.conn.execute("SELECT id FROM patients ORDER BY id")):
        resources = [json.loads(store.resource_json(text, rtype, rid))
                     for rtype, rid, text in store.conn.execute(
            "SELECT type, id, json FROM resources WHERE patient_id = ?", (pid,))]  # fmt: skip
        result = scorer.score(resources, patient_id=pid, as_of=cutoff)
        if result.probability is None:
            missing = tuple(m.name for m in result.blocking)
            blocking = tuple(f"{m.name}: {m.reason}" for m in result.blocking)
            reasons = tuple(result.problems) + blocking
            out.append(Prediction(pid, store.pseudonym(pid), None, None, missing, None, reasons))
            continue
        level = risk_level(result.probability, chosen)
        assessment = build_risk_assessment(
            patient_id=pid, probability=result.probability, model_version=version,
            study=spec.name, outcome=source.outcome, basis=result.basis, occurrence=occurrence,
            identifier=assessment_identifier(spec.name, pid), qualitative=level.qualitative,
            basis_patient=result.uses_demographics,
        )  # fmt: skip
        out.append(
            Prediction(pid, store.pseudonym(pid), result.probability, level.word, (), assessment)
        )
    return out


def write_back(server: FhirServerSource, predictions: list[Prediction]) -> int:
    """Conditional update of each scored patient's RiskAssessment; returns how many were sent."""
    written = 0
    for prediction in predictions:
        if prediction.assessment is None:
            continue
        identifier = prediction.assessment["identifier"][0]["value"]
        search = {"identifier": f"{IDENTIFIER_SYSTEM}|{identifier}"}
        server.put_conditional("RiskAssessment", search, prediction.assessment)
        written += 1
    return written
