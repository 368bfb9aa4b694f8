"""CDS Hooks cards for a risk score, and the FHIR R4 RiskAssessment a card suggests recording.

A scored patient gets one card: the summary names the outcome, the probability and a risk level
(the study's `cds:` block, `CdsSettings`, names the outcome and sets the thresholds of the level
and the indicator), the detail lists the inputs that drove the score and those that were
imputed, and one suggestion creates a RiskAssessment that cites the Observations used. A patient
who cannot be scored gets an `info` card that says what is missing. Every card's `source.url`
and `links` point to the model card of the version that scored it (`aipipe.cds.model_card`).
`build_risk_assessment` is a pure function so that the node's write-back can reuse it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from aipipe.cds.models import SUMMARY_MAX, Action, Card, Coding, Link, Source, Suggestion
from aipipe.cds.scoring import FeatureValue, MissingFeature, ScoreResult
from aipipe.fhir.codes import SNOMED
from aipipe.study.cds import CdsSettings
from aipipe.study.spec import StudySpec

MODEL_SYSTEM = "https://aipipe.dev/fhir/CodeSystem/model-version"
"""RiskAssessment.method: the code is the model version id (content-addressed)."""
IDENTIFIER_SYSTEM = "https://aipipe.dev/fhir/NamingSystem/risk-assessment"
"""RiskAssessment.identifier: one value per (study, patient), see `assessment_identifier`."""
OUTCOME_SYSTEM = "https://aipipe.dev/fhir/CodeSystem/study-outcome"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
PERSONAL_PREFIX = "personal-"  # a site's personal model: "personal-<sha256[:16]>-<global version>"
TOPIC = Coding(
    system="https://aipipe.dev/fhir/CodeSystem/cds-topic",
    code="risk-prediction",
    display="Risk prediction",
)

Indicator = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class RiskLevel:
    word: str
    indicator: Indicator
    qualitative: str  # a code of http://terminology.hl7.org/CodeSystem/risk-probability


def risk_level(probability: float, settings: CdsSettings) -> RiskLevel:
    if probability >= settings.critical_at:
        return RiskLevel("very high", "critical", "high")
    if probability >= settings.warning_at:
        return RiskLevel("high", "warning", "high")
    if probability >= settings.moderate_at:
        return RiskLevel("moderate", "info", "moderate")
    return RiskLevel("low", "info", "low")


@dataclass(frozen=True)
class ModelSource:
    """What a card cites: the study, the model version, the outcome, a page about the model."""

    study: str
    model_version: str
    outcome: Coding
    url: str | None = None

    @classmethod
    def for_study(
        cls, study: StudySpec, model_version: str, settings: CdsSettings, url: str | None = None
    ) -> ModelSource:
        label = settings.outcome_label or study.outcome_display()
        exact = [c for c in study.cohort.label.conditions if not c.endswith("*")]
        exact.sort(key=lambda token: not token.startswith(SNOMED + "|"))  # SNOMED first
        if exact:
            system, _, code = exact[0].partition("|")
            outcome = Coding(system=system, code=code, display=label)
        else:
            outcome = Coding(system=OUTCOME_SYSTEM, code=study.name, display=label)
        return cls(study.name, model_version, outcome, url)

    @property
    def label(self) -> str:
        return self.outcome.display or self.study

    def card_source(self) -> Source:
        return Source(
            label=f"aipipe {self.study} model {short_version(self.model_version)}",
            url=self.url,
            topic=TOPIC,
        )

    def links(self) -> list[Link] | None:
        if self.url is None:
            return None
        return [
            Link(
                label=f"Model card: version {short_version(self.model_version)}, lineage, "
                "validation",
                url=self.url,
                type="absolute",
            )
        ]


def assessment_identifier(study: str, patient_id: str) -> str:
    """The one identity rule for a RiskAssessment, shared by card suggestions and write-back.

    One study's current assessment of one patient (the FHIR Patient id) is one resource: a card
    the EHR accepted, a later write-back and a re-run with a newer model version all update it
    (the server's history keeps the earlier versions; `method` names the model version).
    """
    return hashlib.sha256(f"{study}:{patient_id}".encode()).hexdigest()[:32]


def occurrence_text(occurrence: date | datetime) -> str:
    """FHIR dateTime for the as-of time: an instant in UTC, or a day (data through that day)."""
    if not isinstance(occurrence, datetime):
        return occurrence.isoformat()
    when = occurrence.astimezone(UTC) if occurrence.tzinfo else occurrence.replace(tzinfo=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def short_version(model_version: str) -> str:
    """A version as a card shows it: 12 characters, or a personal model's prefix and 16."""
    return model_version[: 25 if model_version.startswith(PERSONAL_PREFIX) else 12]


def _model_display(study: str, model_version: str) -> str:
    if model_version.startswith(PERSONAL_PREFIX):
        derived = model_version.rsplit("-", 1)[-1]
        return (
            f"this site's personal model for {study} ({short_version(model_version)}), "
            f"derived from federated version {derived[:12]}"
        )
    return f"aipipe federated model for {study}, version {model_version[:12]}"


def build_risk_assessment(
    *,
    patient_id: str,
    probability: float,
    model_version: str,
    study: str,
    outcome: Coding,
    basis: Sequence[str],
    occurrence: date | datetime,
    identifier: str,
    qualitative: str | None = None,
    basis_patient: bool = False,
) -> dict[str, Any]:
    """A FHIR R4 RiskAssessment (status final) of one outcome for one patient.

    `basis` holds Observation ids; `basis_patient` adds the Patient (demographic inputs).
    `occurrence` is the as-of time the features were read at (a date: data through that day).
    `identifier` is `assessment_identifier(study, patient)`, so a client can create it
    conditionally (`If-None-Exist: identifier=<system>|<value>`) and re-runs stay idempotent.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be within [0, 1], not {probability}")
    prediction: dict[str, Any] = {
        "outcome": {"coding": [outcome.dump()], "text": outcome.display or study},
        "probabilityDecimal": round(probability, 4),
    }
    if qualitative is not None:
        prediction["qualitativeRisk"] = {
            "coding": [{"system": RISK_PROBABILITY, "code": qualitative}]
        }
    references = [f"Observation/{rid}" for rid in basis]
    if basis_patient:
        references.insert(0, f"Patient/{patient_id}")
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": identifier}],
        "status": "final",
        "method": {
            "coding": [
                {
                    "system": MODEL_SYSTEM,
                    "code": model_version,
                    "display": _model_display(study, model_version),
                }
            ]
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrenceDateTime": occurrence_text(occurrence),
        "prediction": [prediction],
    }
    if references:  # FHIR forbids empty arrays
        resource["basis"] = [{"reference": ref} for ref in references]
    return resource


def build_cards(
    result: ScoreResult,
    *,
    source: ModelSource,
    settings: CdsSettings,
    now: datetime,
    notes: Sequence[str] = (),
) -> list[Card]:
    """The cards for one scoring: a risk card, an info card saying what is missing, or none
    (a probability below `settings.min_probability`)."""
    if result.probability is None or result.patient_id is None:
        return [unscored_card(source, result.blocking, result.problems, notes)]
    if result.probability < settings.min_probability:
        return []
    return [_risk_card(result, result.probability, result.patient_id, source, settings, now, notes)]


def unscored_card(
    source: ModelSource,
    missing: Sequence[MissingFeature],
    problems: Sequence[str],
    notes: Sequence[str] = (),
) -> Card:
    """An info card for a patient the model cannot score, saying why."""
    if missing:
        names = ", ".join(m.name for m in missing)
        summary = _fit(f"{source.label} risk not scored: missing {names}")
    elif problems:
        summary = _fit(f"{source.label} risk not scored: {problems[0]}")
    else:
        summary = _fit(f"{source.label} risk not scored: the patient's data is unusable")
    lines = [f"The {_md(source.label)} risk model could not score this patient."]
    if missing:
        lines += ["", "**Missing:**", ""] + [f"- {_md(m.name)}: {_md(m.reason)}" for m in missing]
    if problems:
        lines += ["", "**Why not scored / data problems:**", ""]
        lines += [f"- {_md(p)}" for p in problems]
    if notes:
        lines += ["", "**Notes:**", ""] + [f"- {_md(n)}" for n in notes]
    return Card(
        uuid=str(uuid.uuid4()),
        summary=summary,
        detail="\n".join(lines),
        indicator="info",
        source=source.card_source(),
        links=source.links(),
    )


def _risk_card(
    result: ScoreResult,
    probability: float,
    patient_id: str,
    source: ModelSource,
    settings: CdsSettings,
    now: datetime,
    notes: Sequence[str],
) -> Card:
    level = risk_level(probability, settings)
    assessment = build_risk_assessment(
        patient_id=patient_id,
        probability=probability,
        model_version=result.model_version,
        study=result.study,
        outcome=source.outcome,
        basis=result.basis,
        occurrence=now,
        identifier=assessment_identifier(result.study, patient_id),
        qualitative=level.qualitative,
        basis_patient=result.uses_demographics,
    )
    suggestion = Suggestion(
        label="Record this risk assessment in the chart",
        uuid=str(uuid.uuid4()),
        actions=[
            Action(
                type="create",
                description=f"Create a RiskAssessment: {source.label} {_percent(probability)}",
                resource=assessment,
            )
        ],
    )
    return Card(
        uuid=str(uuid.uuid4()),
        summary=_fit(f"{source.label} risk {_percent(probability)} ({level.word})"),
        detail=_detail(result, probability, level, source, notes),
        indicator=level.indicator,
        source=source.card_source(),
        suggestions=[suggestion],
        selectionBehavior="at-most-one",
        links=source.links(),
    )


def _detail(
    result: ScoreResult,
    probability: float,
    level: RiskLevel,
    source: ModelSource,
    notes: Sequence[str],
) -> str:
    values = {v.name: v for v in result.values}
    lines = [
        f"**{_md(source.label)} risk: {_percent(probability)}** ({level.word}), "
        f"model {_md(source.study)} version `{short_version(result.model_version)}`.",
        "",
        "| What drove the score | Value | Effect |",
        "|---|---|---|",
    ]
    for driver in result.drivers:
        effect = "raises risk" if driver.contribution > 0 else "lowers risk"
        if driver.column == f"{driver.feature}_missing":  # a missing-value indicator column
            shown = "not recorded" if values[driver.feature].imputed else "recorded"
            lines.append(f"| {_md(driver.feature)} | {shown} | {effect} |")
        else:  # a numeric column, or a categorical level's column: show the feature's value
            shown = _value_text(values.get(driver.feature))
            lines.append(f"| {_md(driver.feature)} | {shown} | {effect} |")
    imputed = [v for v in result.values if v.imputed]
    if imputed:
        lines += [
            "",
            "**Not in the record, filled in by the model's rule:** "
            + ", ".join(f"{_md(v.name)} ({_value_text(v)})" for v in imputed),
        ]
    if result.basis:
        lines += ["", f"Based on {len(result.basis)} Observation(s)."]
    extra = [*result.problems, *notes]
    if extra:
        lines += ["", "**Notes:**", ""] + [f"- {_md(n)}" for n in extra]
    lines += [
        "",
        "A statistical estimate from a federated model; it supports, and does not replace, "
        "clinical judgement.",
    ]
    return "\n".join(lines)


_UNIT_WORDS = {"a": "years", "mm[Hg]": "mmHg"}


def _value_text(value: FeatureValue | None) -> str:
    if value is None or value.value is None:
        return "missing"
    if value.name == "sex" and value.unit is None and value.value in (0.0, 1.0):
        return "male" if value.value == 1.0 else "female"  # the demographic's encoding
    number = f"{value.value:.4g}"
    unit = _UNIT_WORDS.get(value.unit or "", value.unit)
    return f"{number} {_md(unit)}" if unit else number


def _percent(probability: float) -> str:
    if probability < 0.01:
        return "<1%"
    if probability > 0.99:
        return ">99%"
    return f"{probability * 100:.0f}%"


def _fit(summary: str) -> str:
    return summary if len(summary) <= SUMMARY_MAX else summary[: SUMMARY_MAX - 1] + "…"


_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_{}[]<>()#+!|~"})


def _md(text: str) -> str:
    """Escape GitHub-flavoured Markdown so names and reasons show as written."""
    return text.translate(_MARKDOWN_SPECIAL)
