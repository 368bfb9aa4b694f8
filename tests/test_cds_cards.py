"""Scoring one patient, the card builder, the RiskAssessment and prefetch templates (aipipe.cds)."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fhirclient.models.riskassessment import RiskAssessment
from pydantic import ValidationError

from aipipe.cds import (
    CdsSettings,
    ModelSource,
    PatientScorer,
    build_cards,
    build_risk_assessment,
    prefetch_templates,
    render_template,
    risk_level,
)
from aipipe.cds.models import Card, Coding, Source, Suggestion
from aipipe.cds.scoring import ScoreResult
from aipipe.models import ModelMismatchError, build_model, weights_to_arrays
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec, load_study

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0123456789abcdef" * 4
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# Columns: chol, glucose, glucose_missing, bmi, sex.
STUDY = StudySpec.model_validate(
    {
        "name": "toy-chd",
        "cohort": {"label": {"conditions": ["snomed|53741008"]}},
        "features": [
            {"name": "chol", "codes": ["loinc|2093-3"], "unit": "mg/dL", "missing": "drop"},
            {"name": "glucose", "concept": "glucose", "missing": "indicator"},
            {"name": "bmi", "concept": "bmi", "missing": "impute"},
        ],
        "demographics": ["sex"],
    }
)
WEIGHTS = {
    "head.weight": np.array([[0.8, 0.3, -0.2, 0.5, 0.4]], dtype=np.float32),
    "head.bias": np.array([-0.1], dtype=np.float32),
}
MEAN = np.array([200.0, 100.0, 0.2, 27.0, 0.5])
STD = np.array([40.0, 20.0, 0.4, 4.0, 0.5])
PRE = Preprocessor(fills={1: 100.0, 2: 0.0, 3: 27.0}, mean=MEAN, std=STD)


def patient(pid: str = "p1", gender: str | None = "male") -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": pid, "birthDate": "1960-02-01"}
    if gender is not None:
        resource["gender"] = gender
    return resource


def obs(
    rid: str, code: str, value: float, unit: str, *, pid: str = "p1", when: str = "2024-01-01"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org"},
    }


def full_record() -> list[dict[str, Any]]:
    return [
        patient(),
        obs("chol-1", "2093-3", 260.0, "mg/dL"),
        obs("glu-1", "2339-0", 130.0, "mg/dL"),
        obs("bmi-1", "39156-5", 31.0, "kg/m2"),
    ]


@pytest.fixture(scope="module")
def scorer() -> PatientScorer:
    return PatientScorer(STUDY, WEIGHTS, PRE, VERSION)


def source(settings: CdsSettings | None = None) -> ModelSource:
    chosen = settings or CdsSettings(outcome_label="Coronary artery disease")
    return ModelSource.for_study(STUDY, VERSION, chosen, "https://hub.example.org/v1/models/x")


# -- scoring --------------------------------------------------------------------------------


def test_probability_is_the_logistic_of_the_standardized_inputs(scorer: PatientScorer) -> None:
    z = (np.array([260.0, 130.0, 0.0, 31.0, 1.0]) - MEAN) / (STD + 1e-9)
    expected = 1 / (1 + math.exp(-(float(WEIGHTS["head.weight"][0] @ z) - 0.1)))

    result = scorer.score(full_record())

    assert result.probability == pytest.approx(expected, rel=1e-5)


def test_drivers_are_weight_times_standardized_value_largest_three(scorer: PatientScorer) -> None:
    z = (np.array([260.0, 130.0, 0.0, 31.0, 1.0]) - MEAN) / (STD + 1e-9)
    contributions = WEIGHTS["head.weight"][0] * z  # chol 1.2, glucose .45, ind .1, bmi .5, sex .4

    result = scorer.score(full_record())

    assert [d.column for d in result.drivers] == ["chol", "bmi", "glucose"]
    assert [d.contribution for d in result.drivers] == pytest.approx(
        [contributions[0], contributions[3], contributions[1]], rel=1e-5
    )
    assert result.drivers[0].value == 260.0


def test_a_missing_drop_feature_means_no_score_and_names_it(scorer: PatientScorer) -> None:
    record = [r for r in full_record() if r["id"] != "chol-1"]

    result = scorer.score(record)

    assert result.probability is None
    assert [(m.name, m.blocking) for m in result.missing] == [("chol", True)]
    assert "LOINC 2093-3" in result.missing[0].reason


def test_an_imputed_feature_is_reported_but_does_not_block(scorer: PatientScorer) -> None:
    record = [r for r in full_record() if r["id"] != "glu-1"]

    result = scorer.score(record)

    assert result.scored
    assert [(m.name, m.blocking) for m in result.missing] == [("glucose", False)]
    glucose = next(v for v in result.values if v.name == "glucose")
    assert glucose.imputed and glucose.value == 100.0


def test_a_unit_that_does_not_map_is_missing_with_the_unit_named(scorer: PatientScorer) -> None:
    record = [*full_record()[:1], obs("chol-1", "2093-3", 2.6, "g/L"), *full_record()[2:]]

    result = scorer.score(record)

    assert not result.scored
    assert result.missing[0].reason == "unit 'g/L' cannot be converted to mg/dL"


def test_cholesterol_in_mmol_per_litre_is_converted_to_mg_per_dl(scorer: PatientScorer) -> None:
    record = [*full_record()[:1], obs("chol-1", "2093-3", 5.0, "mmol/L"), *full_record()[2:]]

    result = scorer.score(record)

    chol = next(v for v in result.values if v.name == "chol")
    assert chol.value == pytest.approx(5.0 * 38.67)
    assert chol.unit == "mg/dL"


def test_a_demographic_that_is_missing_blocks_the_score(scorer: PatientScorer) -> None:
    record = [patient(gender=None), *full_record()[1:]]

    result = scorer.score(record)

    assert not result.scored
    assert [(m.name, m.reason) for m in result.missing] == [
        ("sex", "Patient.gender is not male or female")
    ]


def test_observations_of_another_patient_are_not_used(scorer: PatientScorer) -> None:
    record = [r for r in full_record() if r["id"] != "chol-1"]
    record.append(obs("chol-other", "2093-3", 260.0, "mg/dL", pid="p2"))

    result = scorer.score(record, patient_id="p1")

    assert not result.scored
    assert any("other patients" in p for p in result.problems)


def test_observations_after_the_as_of_date_are_not_used(scorer: PatientScorer) -> None:
    record = full_record()
    record[1] = obs("chol-1", "2093-3", 260.0, "mg/dL", when="2024-06-01")

    result = scorer.score(record, as_of=date(2024, 5, 1))

    assert not result.scored
    assert result.missing[0].reason == "only Observations after 2024-05-01"


def test_the_basis_is_the_latest_observation_of_a_latest_feature(scorer: PatientScorer) -> None:
    record = [*full_record(), obs("chol-0", "2093-3", 180.0, "mg/dL", when="2020-01-01")]

    result = scorer.score(record)

    assert result.basis == ("bmi-1", "chol-1", "glu-1")
    assert next(v for v in result.values if v.name == "chol").value == 260.0


def test_a_resource_that_cannot_be_read_is_counted_not_raised(scorer: PatientScorer) -> None:
    broken = obs("glu-2", "2339-0", 1.0, "mg/dL")
    broken["valueQuantity"] = {"value": "high"}

    result = scorer.score([*full_record(), broken])

    assert result.scored
    assert result.problems == (
        "1 resource(s) unusable: Observation.valueQuantity.value is not a number",
    )


def test_no_patient_resource_gives_a_result_without_a_score(scorer: PatientScorer) -> None:
    result = scorer.score(full_record()[1:])

    assert not result.scored and result.problems


# -- cards ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "word", "indicator"),
    [
        (0.05, "low", "info"),
        (0.3, "moderate", "info"),
        (0.6999, "moderate", "info"),
        (0.7, "high", "warning"),
        (0.8999, "high", "warning"),
        (0.9, "very high", "critical"),
        (1.0, "very high", "critical"),
    ],
)
def test_default_thresholds_pick_the_indicator(
    probability: float, word: str, indicator: str
) -> None:
    level = risk_level(probability, CdsSettings())

    assert (level.word, level.indicator) == (word, indicator)


def test_thresholds_are_configurable_per_study() -> None:
    settings = CdsSettings(moderate_at=0.1, warning_at=0.2, critical_at=0.5)

    assert risk_level(0.25, settings).indicator == "warning"
    assert risk_level(0.5, settings).indicator == "critical"


def test_thresholds_must_rise() -> None:
    with pytest.raises(ValidationError, match="thresholds must rise"):
        CdsSettings(warning_at=0.9, critical_at=0.8)


def test_the_risk_card_summary_names_outcome_probability_and_level(scorer: PatientScorer) -> None:
    result = scorer.score(full_record())

    (card,) = build_cards(result, source=source(), settings=CdsSettings(), now=NOW)

    percent = f"{result.probability * 100:.0f}%"  # type: ignore[operator]
    assert card.summary == f"Coronary artery disease risk {percent} (very high)"  # p = 0.93
    assert card.indicator == "critical"


def test_a_long_outcome_label_still_gives_a_summary_under_140_characters(
    scorer: PatientScorer,
) -> None:
    settings = CdsSettings(outcome_label="A" * 80)
    many = StudySpec.model_validate({**STUDY.model_dump(), "name": "x" * 60})
    long_source = ModelSource.for_study(many, VERSION, settings)
    result = scorer.score(full_record()[:1])  # no observations: the unscored card's summary

    cards = [
        *build_cards(scorer.score(full_record()), source=long_source, settings=settings, now=NOW),
        *build_cards(result, source=long_source, settings=settings, now=NOW),
    ]

    assert all(len(card.summary) < 140 for card in cards)


def test_the_card_suggests_creating_a_risk_assessment(scorer: PatientScorer) -> None:
    result = scorer.score(full_record())

    (card,) = build_cards(result, source=source(), settings=CdsSettings(), now=NOW)

    assert card.selectionBehavior == "at-most-one"
    assert card.suggestions is not None
    (action,) = card.suggestions[0].actions or []
    assert action.type == "create"
    assert action.resource is not None and action.resource["resourceType"] == "RiskAssessment"
    assert action.resource["prediction"][0]["probabilityDecimal"] == round(
        result.probability or 0, 4
    )


def test_the_card_source_and_link_name_the_model_version(scorer: PatientScorer) -> None:
    (card,) = build_cards(
        scorer.score(full_record()), source=source(), settings=CdsSettings(), now=NOW
    )

    assert VERSION[:12] in card.source.label
    assert card.source.url == "https://hub.example.org/v1/models/x"
    assert card.links is not None and card.links[0].type == "absolute"


def test_the_detail_lists_the_drivers_and_the_imputed_values(scorer: PatientScorer) -> None:
    record = [r for r in full_record() if r["id"] != "bmi-1"]

    (card,) = build_cards(scorer.score(record), source=source(), settings=CdsSettings(), now=NOW)

    assert card.detail is not None
    assert "| chol | 260 mg/dL | raises risk |" in card.detail
    assert "bmi (27 kg/m2)" in card.detail


def test_a_patient_who_cannot_be_scored_gets_an_info_card_saying_what_is_missing(
    scorer: PatientScorer,
) -> None:
    record = [r for r in full_record() if r["id"] != "chol-1"]

    (card,) = build_cards(scorer.score(record), source=source(), settings=CdsSettings(), now=NOW)

    assert card.indicator == "info"
    assert card.summary == "Coronary artery disease risk not scored: missing chol"
    assert card.detail is not None and "no Observation coded LOINC 2093-3" in card.detail
    assert card.suggestions is None


def test_below_the_minimum_probability_there_is_no_card(scorer: PatientScorer) -> None:
    result = scorer.score(full_record())

    cards = build_cards(
        result, source=source(), settings=CdsSettings(min_probability=0.99), now=NOW
    )

    assert cards == []


def test_markdown_in_notes_is_escaped() -> None:
    result = ScoreResult(study="s", model_version=VERSION, patient_id="p1", probability=None)
    card = build_cards(result, source=source(), settings=CdsSettings(), now=NOW, notes=["a_b|c"])[0]

    assert card.detail is not None and "a\\_b\\|c" in card.detail


def test_a_card_with_suggestions_needs_a_selection_behavior() -> None:
    with pytest.raises(ValidationError, match="selectionBehavior"):
        Card(
            summary="s",
            indicator="info",
            source=Source(label="x"),
            suggestions=[Suggestion(label="do")],
        )


def test_a_summary_of_140_characters_is_refused() -> None:
    with pytest.raises(ValidationError):
        Card(summary="x" * 140, indicator="info", source=Source(label="x"))


def test_optional_card_fields_are_omitted_not_null() -> None:
    card = Card(summary="s", indicator="info", source=Source(label="x"))

    assert card.dump() == {"summary": "s", "indicator": "info", "source": {"label": "x"}}


# -- RiskAssessment -------------------------------------------------------------------------


def assessment(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "patient_id": "p1",
        "probability": 0.734,
        "model_version": VERSION,
        "study": "toy-chd",
        "outcome": Coding(system="http://snomed.info/sct", code="53741008", display="CAD"),
        "basis": ["chol-1", "glu-1"],
        "occurrence": NOW,
        "identifier": "abc123",
        "qualitative": "high",
    }
    return build_risk_assessment(**{**arguments, **overrides})


def test_the_risk_assessment_is_valid_fhir_r4() -> None:
    parsed = RiskAssessment(assessment(), strict=True)

    assert parsed.status == "final"
    assert parsed.subject.reference == "Patient/p1"
    assert parsed.occurrenceDateTime.as_json() == "2024-05-01T12:00:00Z"
    assert parsed.method.coding[0].code == VERSION
    assert [b.reference for b in parsed.basis] == ["Observation/chol-1", "Observation/glu-1"]
    prediction = parsed.prediction[0]
    assert prediction.outcome.coding[0].system == "http://snomed.info/sct"
    assert prediction.outcome.coding[0].code == "53741008"
    assert prediction.probabilityDecimal == 0.734
    assert parsed.identifier[0].value == "abc123"


def test_the_card_risk_assessment_is_valid_fhir_r4(scorer: PatientScorer) -> None:
    (card,) = build_cards(
        scorer.score(full_record()), source=source(), settings=CdsSettings(), now=NOW
    )
    resource = card.suggestions[0].actions[0].resource  # type: ignore[index]

    parsed = RiskAssessment(resource, strict=True)

    assert parsed.basis[0].reference == "Patient/p1"  # the demographic input
    assert {b.reference for b in parsed.basis[1:]} == {
        "Observation/chol-1",
        "Observation/glu-1",
        "Observation/bmi-1",
    }


def test_a_risk_assessment_without_basis_omits_the_element() -> None:
    resource = assessment(basis=[])

    assert "basis" not in resource
    RiskAssessment(resource, strict=True)


def test_a_probability_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="within"):
        assessment(probability=73.0)


def test_the_same_inputs_give_the_same_identifier_on_a_re_run(scorer: PatientScorer) -> None:
    first = build_cards(
        scorer.score(full_record()), source=source(), settings=CdsSettings(), now=NOW
    )
    later = datetime(2024, 6, 1, tzinfo=UTC)
    second = build_cards(
        scorer.score(full_record()), source=source(), settings=CdsSettings(), now=later
    )

    identifiers = [c.suggestions[0].actions[0].resource["identifier"] for c in (*first, *second)]  # type: ignore[index]
    assert identifiers[0] == identifiers[1]


# -- prefetch templates ---------------------------------------------------------------------


def test_templates_ask_for_the_patient_and_the_study_codes() -> None:
    study = load_study(ROOT / "examples" / "heart-disease" / "study.yaml")

    templates = prefetch_templates(study)

    assert templates["patient"] == "Patient/{{context.patientId}}"
    observations = templates["observations"]
    assert observations.startswith("Observation?patient={{context.patientId}}&code=")
    assert "http://loinc.org|2093-3" in observations
    assert "http://loinc.org|8480-6" in observations
    assert observations.endswith("&_sort=-date&_count=200")
    assert templates["conditions"] == (
        "Condition?patient={{context.patientId}}&code=http://snomed.info/sct|53741008&_count=200"
    )


def test_a_prefix_code_makes_the_search_ask_for_every_resource_of_the_patient() -> None:
    study = load_study(ROOT / "examples" / "synthea" / "study.yaml")  # label: icd10|E11*

    templates = prefetch_templates(study)

    assert templates["conditions"] == "Condition?patient={{context.patientId}}&_count=200"
    assert "code=" in templates["observations"]


def test_rendering_fills_and_escapes_context_tokens() -> None:
    rendered = render_template(
        "Observation?patient={{context.patientId}}&code=http://loinc.org|2093-3",
        {"patientId": "a b/c"},
    )

    assert rendered == "Observation?patient=a%20b%2Fc&code=http://loinc.org|2093-3"


def test_rendering_a_user_token_reads_the_user_id() -> None:
    rendered = render_template(
        "PractitionerRole?_id={{userPractitionerRoleId}}", {"userId": "PractitionerRole/123"}
    )

    assert rendered == "PractitionerRole?_id=123"


@pytest.mark.parametrize("context", [{}, {"patientId": {"id": 1}}, {"patientId": ""}])
def test_a_token_the_context_cannot_fill_is_an_error(context: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="cannot be filled"):
        render_template("Patient/{{context.patientId}}", context)


def test_an_mlp_is_scored_with_gradient_times_input_drivers() -> None:
    study = StudySpec.model_validate(
        {**STUDY.model_dump(), "model": {"kind": "mlp", "hidden": [4]}}
    )
    model = build_model(study.model, 5, seed=2)
    scorer = PatientScorer(study, weights_to_arrays(model), PRE, VERSION)
    z = (np.array([260.0, 130.0, 0.0, 31.0, 1.0]) - MEAN) / (STD + 1e-9)

    result = scorer.score(full_record())

    with torch.no_grad():
        expected = torch.sigmoid(model(torch.tensor(z[None, :], dtype=torch.float32))).item()
    assert result.probability == pytest.approx(expected, rel=1e-5)
    assert len(result.drivers) == 3
    magnitudes = [abs(d.contribution) for d in result.drivers]
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_weights_of_another_shape_are_refused() -> None:
    wrong = {"head.weight": np.zeros((1, 4), np.float32), "head.bias": np.zeros(1, np.float32)}

    with pytest.raises(ModelMismatchError):
        PatientScorer(STUDY, wrong, PRE, VERSION)
