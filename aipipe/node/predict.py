"""Score a node's cohort with the study's current model and, optionally, write the scores back
to the EHR as FHIR R4 RiskAssessments.

Scoring reuses the CDS scorer (one code path from resources to probability) with the site's own
train preprocessing. Each RiskAssessment carries an identifier derived from (study, patient), so
a re-run is a conditional update of the same resource, never a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from aipipe.cds import CdsSettings, ModelSource, PatientScorer, build_risk_assessment, risk_level
from aipipe.cds.cards import IDENTIFIER_SYSTEM
from aipipe.errors import StudyError
from aipipe.fhir.server import FhirServerSource
from aipipe.store.node_store import NodeStore
from aipipe.study.features import site_preprocessor
from aipipe.study.spec import StudySpec


@dataclass(frozen=True)
class Prediction:
    patient_id: str
    pseudonym: str
    probability: float | None
    level: str | None
    missing: tuple[str, ...]
    assessment: dict[str, Any] | None
    reasons: tuple[str, ...] = ()  # why not scored: outside the population, unscalable inputs


def assessment_identifier(study: str, patient_id: str) -> str:
    return hashlib.sha256(f"{study}:{patient_id}".encode()).hexdigest()[:32]


def predict_cohort(
    store: NodeStore,
    spec: StudySpec,
    weights: Mapping[str, np.ndarray],
    version: str,
    *,
    now: datetime,
    settings: CdsSettings | None = None,
) -> list[Prediction]:
    """Score every patient of the store; a patient missing a required feature, or outside the
    study's population, is not scored (`reasons` says why). Raises `StudyError` when this site
    cannot scale the model's inputs at all (too few train patients)."""
    chosen = settings or CdsSettings()
    preprocessor = site_preprocessor(store, spec)
    if preprocessor.problems():
        raise StudyError(f"study '{spec.name}': {'; '.join(preprocessor.problems())}")
    scorer = PatientScorer(spec, weights, preprocessor, version)
    source = ModelSource.for_study(spec, version, chosen)
    out = []
    for (pid,) in list(store.conn.execute("SELECT id FROM patients ORDER BY id")):
        resources = [json.loads(text) for (text,) in store.conn.execute(
            "SELECT json FROM resources WHERE patient_id = ?", (pid,))]  # fmt: skip
        result = scorer.score(resources, patient_id=pid)
        if result.probability is None:
            missing = tuple(m.name for m in result.blocking)
            blocking = tuple(f"{m.name}: {m.reason}" for m in result.blocking)
            reasons = tuple(result.problems) + blocking
            out.append(Prediction(pid, store.pseudonym(pid), None, None, missing, None, reasons))
            continue
        level = risk_level(result.probability, chosen)
        assessment = build_risk_assessment(
            patient_id=pid, probability=result.probability, model_version=version,
            study=spec.name, outcome=source.outcome, basis=result.basis, occurrence=now,
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
