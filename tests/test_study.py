"""Study YAML validation and feature extraction (aipipe.study)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from aipipe.errors import StudyError
from aipipe.fhir.codes import ICD10CM, LOINC, SNOMED
from aipipe.fhir.mapping import map_resource
from aipipe.node.ingest import ingest_files
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix, extract
from aipipe.study.raw import raw_matrix
from aipipe.study.spec import StudySpec, load_study, parse_study
from aipipe.wire import SecureMode

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT.parent / "shared" / "data" / "synthea_fhir_r4" / "bundles"
SYNTHEA_STUDY = ROOT / "examples" / "synthea" / "study.yaml"
KEY = b"k" * 32
LOCAL = "http://example.org/codes"

BASE_STUDY: dict[str, Any] = {
    "name": "tiny",
    "cohort": {"label": {"conditions": ["snomed|44054006"]}},
    "features": [{"name": "glucose", "codes": ["loinc|2339-0"]}],
    "preprocessing": {"standardize": "none"},
}


def study_dict(**changes: Any) -> dict[str, Any]:
    return {**BASE_STUDY, **changes}


def study(**changes: Any) -> StudySpec:
    return parse_study(yaml.safe_dump(study_dict(**changes)))


def study_error(raw: Any) -> str:
    text = raw if isinstance(raw, str) else yaml.safe_dump(raw)
    with pytest.raises(StudyError) as caught:
        parse_study(text, source="study.yaml")
    return str(caught.value)


# -- validation ---------------------------------------------------------------------------


def test_a_valid_study_expands_its_short_code_systems() -> None:
    spec = study()

    assert spec.cohort.label.conditions == [f"{SNOMED}|44054006"]
    assert spec.features[0].codes == [f"{LOINC}|2339-0"]


def test_an_unknown_concept_is_refused_naming_the_feature_and_concept() -> None:
    message = study_error(study_dict(features=[{"name": "sugar", "concept": "sugar"}]))

    assert "features.0" in message
    assert "feature 'sugar': unknown concept 'sugar'" in message


def test_a_categorical_feature_without_levels_is_refused() -> None:
    feature = {"name": "cp", "codes": [f"{LOCAL}|cp"], "kind": "categorical"}

    message = study_error(study_dict(features=[feature]))

    assert "features.0" in message and "categorical feature 'cp' needs its `levels`" in message


def test_a_categorical_feature_with_mean_aggregation_is_refused() -> None:
    feature = {
        "name": "cp",
        "codes": [f"{LOCAL}|cp"],
        "kind": "categorical",
        "levels": [1, 2],
        "aggregation": "mean",
    }

    message = study_error(study_dict(features=[feature]))

    assert "categorical feature 'cp' needs latest, min or max" in message


def test_a_feature_without_codes_or_concept_is_refused() -> None:
    message = study_error(study_dict(features=[{"name": "empty"}]))

    assert "feature 'empty' needs `codes` or a `concept`" in message


def test_duplicate_feature_names_are_refused_naming_the_name() -> None:
    features = [{"name": "g", "codes": ["loinc|2339-0"]}, {"name": "g", "codes": ["loinc|2345-7"]}]

    message = study_error(study_dict(features=features))

    assert "feature names must be unique; repeated: g" in message


def test_a_feature_named_like_a_demographic_is_refused() -> None:
    features = [{"name": "sex", "codes": ["loinc|2339-0"]}]

    message = study_error(study_dict(features=features, demographics=["sex"]))

    assert "repeated: sex" in message


def test_two_features_that_would_produce_the_same_column_are_refused() -> None:
    features = [
        {"name": "glucose", "codes": ["loinc|2339-0"], "missing": "indicator"},
        {"name": "glucose_missing", "codes": ["loinc|2345-7"]},
    ]

    with pytest.raises(StudyError, match="glucose_missing"):
        parse_study(yaml.safe_dump(study_dict(features=features)))


def test_age_without_a_reference_date_is_refused() -> None:
    message = study_error(study_dict(demographics=["age"]))

    assert "reference_date" in message


def test_a_code_without_a_system_is_refused_naming_the_field() -> None:
    message = study_error(study_dict(features=[{"name": "g", "codes": ["2339-0"]}]))

    assert "features.0.codes" in message and "'2339-0' must be written system|code" in message


def test_an_unknown_key_is_refused_naming_it() -> None:
    message = study_error(study_dict(epochs=3))

    assert "epochs: Extra inputs are not permitted" in message


def test_a_file_that_is_not_yaml_is_refused() -> None:
    message = study_error("name: [unclosed")

    assert message.startswith("study.yaml is not valid YAML")


def test_a_yaml_list_is_refused_as_not_a_mapping() -> None:
    message = study_error("- name\n- cohort\n")

    assert message == "study.yaml must be a YAML mapping with name, cohort and features"


def test_a_missing_study_file_is_a_study_error(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="cannot read study file"):
        load_study(tmp_path / "absent.yaml")


def test_the_digest_is_the_same_for_the_same_study() -> None:
    assert study().digest() == study().digest()


@pytest.mark.parametrize(
    "change",
    [
        {"features": [{"name": "glucose", "codes": ["loinc|2345-7"]}]},
        {"training": {"rounds": 16}},
        {"privacy": {"epsilon": 2.0}},
        {"cohort": {"label": {"conditions": ["icd10|E11*"]}}},
    ],
    ids=["feature-code", "rounds", "epsilon", "label"],
)
def test_the_digest_changes_when_the_study_changes(change: dict[str, Any]) -> None:
    assert study(**change).digest() != study().digest()


# Digests of `study(secure=...)` as nodes approved them while `secure` was a string Literal.
APPROVED_DIGESTS = {
    "none": "da5cc3bda9f2d033a30347fcad7fe7123e5bbf5a46f633ab7d4800fe400a0b78",
    "secagg": "c557cc1aaff821a209842413f880fc220fdf9681f363277abfb21b4e0d03e028",
    "ckks": "8d1fb28c11b6b80ab32b1c8175b2397bf3c693f9546b073e040c0bdf8fba1f08",
}


@pytest.mark.parametrize("mode", list(SecureMode), ids=str)
def test_the_secure_mode_is_the_wire_enum_and_keeps_the_approved_digest(mode: SecureMode) -> None:
    spec = study(secure=mode.value)

    assert spec.secure is mode
    assert spec.digest() == APPROVED_DIGESTS[mode.value]


def test_columns_list_indicators_one_hot_levels_and_demographics_in_order() -> None:
    features = [
        {"name": "g", "codes": ["loinc|2339-0"], "missing": "indicator"},
        {
            "name": "cp",
            "codes": [f"{LOCAL}|cp"],
            "kind": "categorical",
            "levels": [1, 2, 3.5],
            "drop_first": True,
        },
    ]

    spec = study(features=features, demographics=["age", "sex"], reference_date="2021-01-01")

    assert spec.columns() == ["g", "g_missing", "cp_2", "cp_3.5", "age", "sex"]


# -- a tiny handmade store ----------------------------------------------------------------


def patient(pid: str, *, sex: str = "female", birth: str = "1970-06-01") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": sex, "birthDate": birth}


def obs(
    pid: str, value: float, *, code: str = f"{LOINC}|2339-0", unit: str | None = "mg/dL", when: str
) -> dict[str, Any]:
    system, _, local = code.partition("|")
    quantity: dict[str, Any] = {"value": value}
    if unit is not None:
        quantity["unit"] = unit
    return {
        "resourceType": "Observation",
        "id": f"{pid}-{local}-{when}".replace(":", ""),
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": system, "code": local}]},
        "effectiveDateTime": when,
        "valueQuantity": quantity,
    }


def condition(pid: str, onset: str, *, code: str = f"{SNOMED}|44054006") -> dict[str, Any]:
    system, _, local = code.partition("|")
    return {
        "resourceType": "Condition",
        "id": f"{pid}-c-{local}".replace(".", "-"),
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": system, "code": local}]},
        "onsetDateTime": onset,
    }


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Any]:
    opened: list[NodeStore] = []

    def build(resources: list[dict[str, Any]]) -> NodeStore:
        store = NodeStore.open(tmp_path / f"store{len(opened)}.sqlite", KEY)
        opened.append(store)
        store.write_batch([map_resource(resource) for resource in resources])
        return store

    yield build
    for store in opened:
        store.close()


def glucose_cohort(missing: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Six patients p0..p5 with glucose 100, 110, ..., 150, except those in `missing`."""
    resources: list[dict[str, Any]] = []
    for i in range(6):
        pid = f"p{i}"
        resources.append(patient(pid))
        if pid not in missing:
            resources.append(obs(pid, 100.0 + 10 * i, when="2020-01-01"))
    return resources


def rows(matrix: FeatureMatrix) -> dict[str, list[float]]:
    x = np.concatenate([matrix.x_train, matrix.x_test])
    ids = matrix.train_ids + matrix.test_ids
    return {pid: [float(v) for v in row] for pid, row in zip(ids, x, strict=True)}


def labels(matrix: FeatureMatrix) -> dict[str, float]:
    y = np.concatenate([matrix.y_train, matrix.y_test])
    return dict(zip(matrix.train_ids + matrix.test_ids, map(float, y), strict=True))


def test_a_patient_missing_a_drop_feature_is_left_out(make_store: Any) -> None:
    store = make_store(glucose_cohort(missing=("p4", "p5")))

    matrix = extract(store, study())

    assert sorted(matrix.train_ids + matrix.test_ids) == ["p0", "p1", "p2", "p3"]
    assert (matrix.patients, matrix.cohort) == (6, 4)
    assert matrix.missing == {"glucose": round(2 / 6, 4)}


def test_train_and_test_partition_the_cohort(make_store: Any) -> None:
    store = make_store(glucose_cohort())

    matrix = extract(store, study(split={"method": "seeded", "seed": 43}))

    assert set(matrix.train_ids).isdisjoint(matrix.test_ids)
    assert sorted(matrix.train_ids + matrix.test_ids) == [f"p{i}" for i in range(6)]
    assert len(matrix.test_ids) == 3  # ceil(0.34 * 6)


def test_impute_fills_a_missing_value_with_the_train_mean(make_store: Any) -> None:
    store = make_store(glucose_cohort(missing=("p5",)))
    feature = {"name": "glucose", "codes": ["loinc|2339-0"], "missing": "impute"}

    matrix = extract(store, study(features=[feature]))

    by_id = rows(matrix)
    train_values = [by_id[pid][0] for pid in matrix.train_ids if pid != "p5"]
    assert by_id["p5"] == [pytest.approx(np.mean(train_values))]
    assert by_id["p0"] == [100.0]


def test_impute_with_a_study_value_fills_with_that_value(make_store: Any) -> None:
    store = make_store(glucose_cohort(missing=("p5",)))
    feature = {"name": "glucose", "codes": ["loinc|2339-0"], "missing": "impute", "impute": 80}

    matrix = extract(store, study(features=[feature]))

    assert rows(matrix)["p5"] == [80.0]


def test_indicator_adds_a_missing_column_and_fills_the_value(make_store: Any) -> None:
    store = make_store(glucose_cohort(missing=("p5",)))
    feature = {"name": "glucose", "codes": ["loinc|2339-0"], "missing": "indicator"}

    matrix = extract(store, study(features=[feature]))

    by_id = rows(matrix)
    train_values = [by_id[pid][0] for pid in matrix.train_ids if pid != "p5"]
    assert matrix.columns == ["glucose", "glucose_missing"]
    assert by_id["p5"] == [pytest.approx(np.mean(train_values)), 1.0]
    assert by_id["p1"] == [110.0, 0.0]


@pytest.mark.parametrize(
    ("drop_first", "columns", "expected"),
    [
        (True, ["cp_2", "cp_3"], {"p0": [0.0, 0.0], "p1": [1.0, 0.0], "p2": [0.0, 1.0]}),
        (
            False,
            ["cp_1", "cp_2", "cp_3"],
            {"p0": [1.0, 0.0, 0.0], "p1": [0.0, 1.0, 0.0], "p2": [0.0, 0.0, 1.0]},
        ),
    ],
    ids=["drop-first", "all-levels"],
)
def test_a_categorical_feature_is_one_hot_encoded(
    make_store: Any, drop_first: bool, columns: list[str], expected: dict[str, list[float]]
) -> None:
    resources: list[dict[str, Any]] = []
    for i, level in enumerate([1, 2, 3, 1]):
        resources += [patient(f"p{i}"), obs(f"p{i}", level, code=f"{LOCAL}|cp", when="2020-01-01")]
    store = make_store(resources)
    feature = {
        "name": "cp",
        "codes": [f"{LOCAL}|cp"],
        "kind": "categorical",
        "levels": [1, 2, 3],
        "drop_first": drop_first,
    }

    matrix = extract(store, study(features=[feature]))

    by_id = rows(matrix)
    assert matrix.columns == columns
    assert {pid: by_id[pid] for pid in expected} == expected


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [("latest", 30.0), ("mean", 20.0), ("min", 10.0), ("max", 30.0), ("count", 3.0)],
)
def test_an_aggregation_reduces_a_patients_values_to_one(
    make_store: Any, aggregation: str, expected: float
) -> None:
    readings = [(10.0, "2020-01-01"), (30.0, "2020-03-01"), (20.0, "2020-02-01")]
    resources = [patient("p0"), patient("p1"), obs("p1", 5.0, when="2020-01-01")]
    resources += [obs("p0", value, when=when) for value, when in readings]
    store = make_store(resources)
    feature = {"name": "glucose", "codes": ["loinc|2339-0"], "aggregation": aggregation}

    matrix = extract(store, study(features=[feature]))

    assert rows(matrix)["p0"] == [expected]


def test_a_concept_converts_values_to_its_unit(make_store: Any) -> None:
    resources = [patient("p0"), obs("p0", 5.5, unit="mmol/L", when="2020-01-01")]
    resources += [patient("p1"), obs("p1", 95.0, code=f"{LOINC}|2345-7", when="2020-01-01")]
    store = make_store(resources)

    matrix = extract(store, study(features=[{"name": "glucose", "concept": "glucose"}]))

    by_id = rows(matrix)
    assert by_id["p0"] == [pytest.approx(99.09, abs=0.01)]
    assert by_id["p1"] == [95.0]
    assert matrix.unconverted == {}


def test_a_value_in_an_unconvertible_unit_is_skipped_and_counted(make_store: Any) -> None:
    resources = [*glucose_cohort(missing=("p5",)), obs("p5", 1.0, unit="g/L", when="2020-01-01")]
    store = make_store(resources)

    matrix = extract(store, study(features=[{"name": "glucose", "concept": "glucose"}]))

    assert matrix.unconverted == {"glucose": 1}
    assert "p5" not in matrix.train_ids + matrix.test_ids


def test_observations_after_the_reference_date_are_ignored(make_store: Any) -> None:
    resources = [*glucose_cohort(), obs("p0", 500.0, when="2022-06-01")]
    store = make_store(resources)

    matrix = extract(store, study(reference_date="2021-01-01"))

    assert rows(matrix)["p0"] == [100.0]


def test_age_and_sex_are_taken_from_the_patient(make_store: Any) -> None:
    resources = [
        patient("p0", sex="male", birth="1950-12-31"),
        obs("p0", 100.0, when="2020-01-01"),
        patient("p1", sex="female", birth="1990-01-01"),
        obs("p1", 110.0, when="2020-01-01"),
    ]
    store = make_store(resources)

    matrix = extract(store, study(demographics=["age", "sex"], reference_date="2021-04-01"))

    assert matrix.columns == ["glucose", "age", "sex"]
    assert rows(matrix) == {"p0": [100.0, 71.0, 1.0], "p1": [110.0, 31.0, 0.0]}


def test_the_label_is_one_for_patients_with_a_label_condition(make_store: Any) -> None:
    store = make_store([*glucose_cohort(), condition("p1", "2019-01-01")])

    matrix = extract(store, study())

    assert labels(matrix) == {f"p{i}": float(i == 1) for i in range(6)}


def test_the_label_window_leaves_out_conditions_with_onset_outside_it(make_store: Any) -> None:
    conditions = [condition("p0", "2010-05-01"), condition("p1", "2018-05-01")]
    store = make_store(glucose_cohort() + conditions)
    label = {"conditions": ["snomed|44054006"], "window": {"start": "2015-01-01"}}

    matrix = extract(store, study(cohort={"label": label}))

    assert (labels(matrix)["p0"], labels(matrix)["p1"]) == (0.0, 1.0)


def test_an_icd10_wildcard_label_matches_descendant_codes(make_store: Any) -> None:
    conditions = [
        condition("p0", "2019-01-01", code=f"{ICD10CM}|E11.9"),
        condition("p1", "2019-01-01", code=f"{ICD10CM}|E10.9"),
    ]
    store = make_store(glucose_cohort() + conditions)

    matrix = extract(store, study(cohort={"label": {"conditions": ["icd10|E11*"]}}))

    assert (labels(matrix)["p0"], labels(matrix)["p1"]) == (1.0, 0.0)


def test_two_extractions_of_the_same_study_are_identical(make_store: Any) -> None:
    store = make_store([*glucose_cohort(), condition("p1", "2019-01-01")])
    spec = study(preprocessing={"standardize": "site"})

    first, second = extract(store, spec), extract(store, spec)

    assert (first.train_ids, first.test_ids) == (second.train_ids, second.test_ids)
    assert np.array_equal(first.x_train, second.x_train)
    assert np.array_equal(first.x_test, second.x_test)
    assert np.array_equal(first.y_train, second.y_train)


def test_standardize_gives_train_columns_of_mean_zero_and_std_one(make_store: Any) -> None:
    resources = glucose_cohort()
    resources += [
        obs(f"p{i}", 20.0 + i * i, code=f"{LOINC}|39156-5", when="2020-01-01") for i in range(6)
    ]
    store = make_store(resources)
    features = [
        {"name": "glucose", "codes": ["loinc|2339-0"]},
        {"name": "bmi", "codes": ["loinc|39156-5"]},
    ]

    matrix = extract(store, study(features=features, preprocessing={"standardize": "site"}))

    assert np.allclose(matrix.x_train.mean(axis=0), 0.0, atol=1e-6)
    assert np.allclose(matrix.x_train.std(axis=0, ddof=1), 1.0, atol=1e-6)


def test_standardize_scales_the_test_set_with_the_train_statistics(make_store: Any) -> None:
    store = make_store(glucose_cohort())

    matrix = extract(store, study(preprocessing={"standardize": "site"}))

    raw = {f"p{i}": 100.0 + 10 * i for i in range(6)}
    train = np.array([raw[pid] for pid in matrix.train_ids])
    test_pid = matrix.test_ids[0]
    expected = (raw[test_pid] - train.mean()) / (train.std(ddof=1) + 1e-9)
    assert float(matrix.x_test[0, 0]) == pytest.approx(expected, rel=1e-5)


def test_extracting_from_an_empty_store_is_a_study_error(make_store: Any) -> None:
    store = make_store([])

    with pytest.raises(StudyError, match="no patients; ingest data first"):
        extract(store, study())


def test_a_study_that_keeps_fewer_than_two_patients_is_a_study_error(make_store: Any) -> None:
    store = make_store(glucose_cohort(missing=("p1", "p2", "p3", "p4", "p5")))

    with pytest.raises(StudyError, match="keeps 1 of 6 patients"):
        extract(store, study())


def test_a_cohort_too_small_to_stratify_does_not_crash_the_extraction(make_store: Any) -> None:
    resources = [
        resource
        for i in range(7)
        for resource in (patient(f"p{i}"), obs(f"p{i}", 100.0 + i, when="2020-01-01"))
    ]
    store = make_store(resources + [condition(f"p{i}", "2019-01-01") for i in range(3)])
    spec = study(split={"test_fraction": 0.1})

    try:
        matrix = extract(store, spec)
    except StudyError:
        return
    assert matrix.cohort == 7


# -- the Synthea example study ------------------------------------------------------------


@pytest.fixture(scope="module")
def synthea_matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudySpec, FeatureMatrix]:
    if not SYNTHEA_STUDY.is_file():
        pytest.skip(f"example study missing: {SYNTHEA_STUDY}")
    if not BUNDLES.is_dir():
        pytest.skip(f"Synthea data missing: {BUNDLES}")
    # Without its `population` (living adults, two-year look-back): these tests count the data
    # as its README does; test_the_synthea_population_leaves_out_children_and_the_dead below.
    spec = load_study(SYNTHEA_STUDY).model_copy(update={"population": None})
    store = NodeStore.open(tmp_path_factory.mktemp("synthea") / "store.sqlite", KEY)
    try:
        ingest_files(store, [BUNDLES])
        return spec, extract(store, spec)
    finally:
        store.close()


def test_the_synthea_population_leaves_out_children_and_the_dead(
    tmp_path: Path, synthea_matrix: tuple[StudySpec, FeatureMatrix]
) -> None:
    spec = load_study(SYNTHEA_STUDY)
    store = NodeStore.open(tmp_path / "store.sqlite", KEY)
    try:
        ingest_files(store, [BUNDLES])
        raw = raw_matrix(store, spec)
        deceased = {pid for (pid,) in store.conn.execute("SELECT id FROM patients WHERE deceased")}
    finally:
        store.close()
    age = raw.x[:, spec.columns().index("age")]
    outside = {pid for pid, a in zip(raw.ids, age, strict=True) if not 18 <= a <= 100}
    assert raw.excluded and set(raw.excluded) == outside | deceased
    assert all(raw.drop_mask[raw.ids.index(pid)] for pid in raw.excluded)


def test_the_synthea_study_keeps_every_patient_with_twelve_diabetics(
    synthea_matrix: tuple[StudySpec, FeatureMatrix],
) -> None:
    _, matrix = synthea_matrix

    assert (matrix.patients, matrix.cohort) == (40, 40)
    assert float(matrix.y_train.sum() + matrix.y_test.sum()) == 12.0


def test_the_synthea_study_has_the_columns_of_its_spec(
    synthea_matrix: tuple[StudySpec, FeatureMatrix],
) -> None:
    spec, matrix = synthea_matrix

    assert matrix.columns == spec.columns()
    assert matrix.x_train.shape[1] == matrix.x_test.shape[1] == len(spec.columns())
    assert not np.isnan(matrix.x_train).any() and not np.isnan(matrix.x_test).any()


def test_the_synthea_study_misses_labs_as_the_data_readme_counts(
    synthea_matrix: tuple[StudySpec, FeatureMatrix],
) -> None:
    _, matrix = synthea_matrix
    # Patients with the lab in shared/data/synthea_fhir_r4/README.md, out of 40.
    with_lab = {"hba1c": 22, "glucose": 21, "cholesterol": 33, "ldl": 33, "bmi": 38}

    missing = {name: matrix.missing[name] for name in with_lab}

    assert missing == {name: round(1 - n / 40, 4) for name, n in with_lab.items()}
    assert matrix.unconverted == {}
