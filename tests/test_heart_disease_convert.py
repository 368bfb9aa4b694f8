"""The shipped heart-disease FHIR files: reproducible, complete, and keeping what FLamby keeps."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.heart_convert_support import EXAMPLE, HOSPITALS, RAW, _load_converter, needs_raw

SHIPPED = EXAMPLE / "fhir"
RESOURCE_TYPES = ("Patient", "Observation", "Condition")
# The columns FLamby keeps before its listwise deletion (slope, ca and thal are dropped first).
FLAMBY_COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
)  # fmt: skip


def _read(hospital: str, rtype: str) -> list[dict[str, Any]]:
    lines = (SHIPPED / hospital / f"{rtype}.ndjson").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _raw_rows(hospital: str) -> list[list[str]]:
    text = (RAW / f"processed.{hospital}.data").read_text(encoding="ascii")
    return [line.split(",") for line in text.splitlines()]


def _present_columns(hospital: str) -> dict[str, set[str]]:
    """Patient id → the FLamby columns it has, read back from the NDJSON."""
    present: dict[str, set[str]] = {}
    for patient in _read(hospital, "Patient"):
        present[patient["id"]] = {"sex"} if patient.get("gender") in ("male", "female") else set()
    for obs in _read(hospital, "Observation"):
        pid = obs["subject"]["reference"].removeprefix("Patient/")
        present[pid].add(obs["id"].removeprefix(f"{pid}-"))
    return present


def _complete_patients(hospital: str) -> list[str]:
    present = _present_columns(hospital)
    return sorted(pid for pid, cols in present.items() if set(FLAMBY_COLUMNS) <= cols)


@needs_raw
def test_a_fresh_conversion_is_byte_identical_to_the_shipped_files(tmp_path: Path) -> None:
    _load_converter().convert(RAW, tmp_path)

    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.ndjson"))
    shipped = sorted(p.relative_to(SHIPPED) for p in SHIPPED.rglob("*.ndjson"))
    assert fresh == shipped
    assert len(fresh) == len(HOSPITALS) * len(RESOURCE_TYPES)
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (SHIPPED / rel).read_bytes(), rel


@pytest.mark.parametrize(
    ("hospital", "expected"),
    [("cleveland", 303), ("hungarian", 294), ("switzerland", 123), ("va", 200)],
)
def test_every_raw_row_becomes_one_patient(hospital: str, expected: int) -> None:
    ids = [p["id"] for p in _read(hospital, "Patient")]

    assert len(ids) == len(set(ids)) == expected
    assert ids == [f"{hospital}-{line:04d}" for line in range(1, expected + 1)]


@pytest.mark.parametrize(
    ("hospital", "expected"),
    [("cleveland", 303), ("hungarian", 261), ("switzerland", 46), ("va", 130)],
)
def test_patients_with_every_flamby_feature_are_the_rows_flamby_keeps(
    hospital: str, expected: int
) -> None:
    assert len(_complete_patients(hospital)) == expected


@needs_raw
@pytest.mark.parametrize("hospital", HOSPITALS)
def test_complete_patients_are_the_rows_of_the_rederived_flamby_split(hospital: str) -> None:
    with (RAW / "flamby_split_rederived.csv").open(encoding="utf-8", newline="") as handle:
        kept = [
            f"{hospital}-{int(row['raw_line']):04d}"
            for row in csv.DictReader(handle)
            if row["center_name"] == hospital
        ]

    assert _complete_patients(hospital) == sorted(kept)


@needs_raw
@pytest.mark.parametrize("hospital", HOSPITALS)
def test_a_cad_condition_exists_exactly_for_raw_rows_with_num_above_zero(hospital: str) -> None:
    raw_positive = {
        f"{hospital}-{line:04d}-cad"
        for line, row in enumerate(_raw_rows(hospital), start=1)
        if float(row[13]) > 0
    }
    conditions = _read(hospital, "Condition")

    assert {c["id"] for c in conditions} == raw_positive
    assert len(conditions) == len(raw_positive)
    codes = {(c["code"]["coding"][0]["system"], c["code"]["coding"][0]["code"]) for c in conditions}
    assert codes == {("http://snomed.info/sct", "53741008")}


@needs_raw
@pytest.mark.parametrize("hospital", HOSPITALS)
def test_observations_carry_every_non_missing_raw_value_and_nothing_else(hospital: str) -> None:
    converter = _load_converter()
    columns = converter.COLUMNS
    expected = {
        f"{hospital}-{line:04d}-{column}": float(text)
        for line, row in enumerate(_raw_rows(hospital), start=1)
        for column, text in zip(columns, row, strict=True)
        if column != "sex" and text.strip() != "?"
    }
    observed = {o["id"]: float(o["valueQuantity"]["value"]) for o in _read(hospital, "Observation")}

    assert observed == expected


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_every_observation_has_a_known_subject_and_a_full_coding(hospital: str) -> None:
    patients = {f"Patient/{p['id']}" for p in _read(hospital, "Patient")}
    observations = _read(hospital, "Observation")

    assert observations
    for obs in observations:
        assert obs["subject"]["reference"] in patients, obs["id"]
        coding = obs["code"]["coding"][0]
        assert coding["system"] and coding["code"] and coding["display"], obs["id"]
        assert obs["status"] == "final"


def test_cholesterol_zeros_are_kept_as_values_like_flamby_keeps_them() -> None:
    zeros = Counter(
        hospital
        for hospital in HOSPITALS
        for obs in _read(hospital, "Observation")
        if obs["id"].endswith("-chol") and obs["valueQuantity"]["value"] == 0
    )

    assert zeros == {"switzerland": 123, "va": 49}
