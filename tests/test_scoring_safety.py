"""Clinical safety of scores (issue 11, items 3 and 5): a small or homogeneous site scores no one
0 or 1, and a patient outside the study's population gets no score but a reason.

Real extraction throughout: FHIR resources go through `map_resource` into a `NodeStore`, the
site's preprocessing is fitted from it, and patients are scored by `predict_cohort` (the `node
predict` path) and `PatientScorer` with the CDS cards (the `serve-cds` path).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.cds import CdsSettings, ModelSource, PatientScorer, build_cards
from aipipe.errors import StudyError
from aipipe.fhir.mapping import map_resource
from aipipe.node.predict import Prediction, predict_cohort
from aipipe.store.node_store import NodeStore
from aipipe.study.features import site_preprocessor
from aipipe.study.preprocessing import Z_CLIP, Preprocessor, z_bounds
from aipipe.study.raw import raw_matrix
from aipipe.study.spec import StudySpec, load_study

ROOT = Path(__file__).resolve().parents[1]
KEY = b"scoring-safety-test-key-32-bytes"
VERSION = "5afe" * 16
NOW = datetime(2024, 1, 1, 12, tzinfo=UTC)

# Columns: glucose, hba1c, age, sex.
BASE_STUDY: dict[str, Any] = {
    "name": "toy-dm",
    "cohort": {"label": {"conditions": ["snomed|44054006"]}},
    "features": [
        {"name": "glucose", "concept": "glucose", "range": [0, 600], "missing": "drop"},
        {"name": "hba1c", "concept": "hba1c", "range": [0, 20], "missing": "drop"},
    ],
    "demographics": ["age", "sex"],
    "reference_date": "2024-01-01",
}
WEIGHTS = {
    "head.weight": np.array([[1.5, 1.5, 1.0, 0.5]], dtype=np.float32),
    "head.bias": np.array([0.0], dtype=np.float32),
}


def patient(pid: str, birth: str, gender: str = "male", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "birthDate": birth, "gender": gender, **extra}


def lab(pid: str, n: int, code: str, value: float, unit: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"{pid}-{code}-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org"},
    }


def glucose(pid: str, value: float, when: str = "2023-06-01") -> dict[str, Any]:
    return lab(pid, 0, "2345-7", value, "mg/dL", when)


def hba1c(pid: str, value: float, when: str = "2023-06-01") -> dict[str, Any]:
    return lab(pid, 0, "4548-4", value, "%", when)


def site(tmp_path: Path, resources: list[dict[str, Any]]) -> NodeStore:
    store = NodeStore.open(tmp_path / "store.sqlite", KEY)
    store.write_batch([map_resource(r) for r in resources])
    return store


def homogeneous_site(n: int) -> list[dict[str, Any]]:
    """n adults with varied glucose and age but the same HbA1c (no spread in that column)."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        pid = f"s{i}"
        gender = "male" if i % 2 else "female"
        out += [patient(pid, f"{1950 + 3 * i}-03-01", gender), glucose(pid, 80.0 + 15 * i)]
        out.append(hba1c(pid, 5.5))
    return out


def scored_or_refused(predictions: list[Prediction]) -> None:
    for p in predictions:
        if p.probability is None:
            assert p.reasons, f"{p.patient_id} not scored without a reason"
        else:
            assert 0.01 < p.probability < 0.99, (p.patient_id, p.probability)


# -- item 3: small or homogeneous sites ------------------------------------------------------


def test_a_six_patient_site_with_a_constant_column_scores_no_one_zero_or_one(
    tmp_path: Path,
) -> None:
    study = StudySpec.model_validate(BASE_STUDY)
    resources = homogeneous_site(6)
    # One patient whose HbA1c differs from the site's constant value.
    resources += [patient("odd", "1970-01-01"), glucose("odd", 140.0), hba1c("odd", 9.5)]
    store = site(tmp_path, resources)
    try:
        predictions = predict_cohort(store, study, WEIGHTS, VERSION, now=NOW)
    except StudyError as exc:  # the node refuses the whole site, saying why
        assert "train patient" in str(exc)
    else:
        scored_or_refused(predictions)
    # The CDS path: the same site serves a card that says why, never a 0 or 1.
    scorer = PatientScorer(study, WEIGHTS, site_preprocessor(store, study), VERSION)
    result = scorer.score(
        [patient("new", "1960-01-01"), glucose("new", 300.0), hba1c("new", 11.0)],
        patient_id="new",
    )
    store.close()
    if result.probability is not None:
        assert 0.01 < result.probability < 0.99
    else:
        source = ModelSource.for_study(study, VERSION, CdsSettings())
        (card,) = build_cards(result, source=source, settings=CdsSettings(), now=NOW)
        assert card.indicator == "info"
        assert "not scored" in card.summary and "train patient" in card.summary


def test_a_site_whose_split_leaves_test_empty_still_scores_or_refuses(tmp_path: Path) -> None:
    """Scoring needs only the train side: a keyed split with no test patient is no error."""
    study = StudySpec.model_validate({**BASE_STUDY, "split": {"test_fraction": 0.01}})
    store = site(tmp_path, homogeneous_site(12))
    prep = site_preprocessor(store, study)
    assert prep.train_rows == 12 and not prep.problems()
    predictions = predict_cohort(store, study, WEIGHTS, VERSION, now=NOW)
    store.close()
    assert all(p.probability is not None for p in predictions)
    scored_or_refused(predictions)


def test_a_value_the_site_never_saw_vary_is_refused_not_scored_a_billion_sds_away(
    tmp_path: Path,
) -> None:
    study = StudySpec.model_validate({**BASE_STUDY, "split": {"test_fraction": 0.01}})
    store = site(tmp_path, homogeneous_site(12))
    scorer = PatientScorer(study, WEIGHTS, site_preprocessor(store, study), VERSION)
    store.close()
    same = scorer.score(
        [patient("a", "1960-01-01"), glucose("a", 150.0), hba1c("a", 5.5)], patient_id="a"
    )
    assert same.probability is not None and 0.01 < same.probability < 0.99
    odd = scorer.score(
        [patient("b", "1960-01-01"), glucose("b", 150.0), hba1c("b", 9.5)], patient_id="b"
    )
    assert odd.probability is None
    assert any("no spread in hba1c" in p for p in odd.problems)


def test_scaling_floors_the_std_and_clips_z_scores() -> None:
    study = StudySpec.model_validate(BASE_STUDY)
    x = np.array([[100.0, 5.5, 50.0, 1.0], [120.0, 5.5, 60.0, 0.0], [140.0, 5.5, 70.0, 1.0]])
    prep = Preprocessor.fit(study, x, [])
    assert prep.std is not None and prep.std[1] == pytest.approx(0.02 * 20)  # 2 % of [0, 20]
    assert prep.flat == (1,)
    far = np.array([[600.0, 20.0, 120.0, 1.0]])
    z = prep.apply(far, z_bounds(study))
    assert np.all(np.abs(z[0, :3]) <= Z_CLIP) and z[0, 0] == Z_CLIP
    assert prep.apply(far)[0, 0] > Z_CLIP  # train rows are not clipped (FLamby parity)


# -- item 5: the population the model applies to ---------------------------------------------

POPULATION_STUDY: dict[str, Any] = {
    **BASE_STUDY,
    "features": [{"name": "glucose", "concept": "glucose", "range": [0, 600], "missing": "drop"}],
    "population": {"age": [18, 100], "alive": True, "lookback_days": 730},
    "split": {"test_fraction": 0.01},
}
POPULATION_WEIGHTS = {
    "head.weight": np.array([[1.0, 0.5, 0.2]], dtype=np.float32),
    "head.bias": np.array([0.0], dtype=np.float32),
}


def population_site() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(10):
        pid = f"a{i}"
        out += [patient(pid, f"{1950 + 4 * i}-05-01", "female" if i % 2 else "male")]
        out.append(glucose(pid, 85.0 + 12 * i))
    return out


OUTSIDERS = [
    # died in 1969 at 54
    patient("dead", "1915-02-01", deceasedDateTime="1969-08-01T00:00:00Z"),
    glucose("dead", 130.0, "1969-07-01"),
    # two years old, with a recent lab
    patient("child", "2022-03-01", "female"),
    glucose("child", 95.0),
    # an adult whose only lab is 30 years old
    patient("old-lab", "1950-01-01"),
    glucose("old-lab", 180.0, "1994-01-01"),
]


def test_patients_outside_the_population_get_no_score_and_a_reason(tmp_path: Path) -> None:
    study = StudySpec.model_validate(POPULATION_STUDY)
    store = site(tmp_path, population_site() + OUTSIDERS)
    predictions = {p.patient_id: p for p in _predict(store, study)}
    scorer = PatientScorer(study, POPULATION_WEIGHTS, site_preprocessor(store, study), VERSION)
    store.close()
    for pid in ("dead", "child", "old-lab"):
        assert predictions[pid].probability is None, pid
        assert predictions[pid].assessment is None
    assert any("died on 1969-08-01" in r for r in predictions["dead"].reasons)
    assert any("2 years old" in r and "18 to 100" in r for r in predictions["child"].reasons)
    assert any("look-back" in r and "1994-01-01" in r for r in predictions["old-lab"].reasons)
    assert all(predictions[f"a{i}"].probability is not None for i in range(10))

    # The CDS path: each gets an info card that says why.
    source = ModelSource.for_study(study, VERSION, CdsSettings())
    by_pid: dict[str, list[dict[str, Any]]] = {}
    for resource in OUTSIDERS:
        ref = resource.get("subject", {}).get("reference", f"Patient/{resource['id']}")
        by_pid.setdefault(ref.removeprefix("Patient/"), []).append(resource)
    expected = {"dead": "died", "child": "2 years old", "old-lab": "look-back"}
    for pid, words in expected.items():
        result = scorer.score(by_pid[pid], patient_id=pid)
        assert result.probability is None
        (card,) = build_cards(result, source=source, settings=CdsSettings(), now=NOW)
        assert card.indicator == "info"
        assert words in card.detail, (pid, card.detail)


def _predict(store: NodeStore, study: StudySpec) -> list[Prediction]:
    return predict_cohort(store, study, POPULATION_WEIGHTS, VERSION, now=NOW)


def test_a_deceased_patient_is_aged_at_death(tmp_path: Path) -> None:
    study = StudySpec.model_validate({**POPULATION_STUDY, "population": None})
    store = site(tmp_path, OUTSIDERS[:2])
    raw = raw_matrix(store, study)
    store.close()
    assert raw.x[raw.ids.index("dead"), 1] == 54.0  # not 109 on the reference date


def test_the_synthea_example_declares_its_population() -> None:
    spec = load_study(ROOT / "examples" / "synthea" / "study.yaml")
    assert spec.population is not None
    assert spec.population.age == (18, 100) and spec.population.alive
    assert spec.population.lookback_days == 730
