"""Convert the UCI Heart Disease files (FLamby's Fed-Heart-Disease) to FHIR R4 Bulk NDJSON.

Each of the four hospitals becomes a folder of `Patient.ndjson`, `Observation.ndjson` and
`Condition.ndjson`, the layout a FHIR Bulk Data `$export` produces, so the demo ingests the
benchmark exactly as a hospital would hand over its own export.

Every raw row becomes a Patient (nothing is filtered here: which rows a study keeps is the
study's business, and FLamby's listwise deletion must be reproduced by the feature extractor,
not baked into the data). A `?` produces no Observation; a 0 is written as 0 even where it means
"not measured" (chol in Switzerland and VA), because FLamby keeps those zeros too.

The output is deterministic (sorted keys, compact separators, fixed dates, rows in raw order),
so running the script again gives byte-identical files. See README.md for the coding choices.

    .venv/bin/python examples/heart-disease/convert.py [--src DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "heart_disease"
DEFAULT_OUT = REPO_ROOT / "examples" / "heart-disease" / "fhir"

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip

# The raw files carry no dates. 1988 is the year the data set was donated to UCI (and the year
# of its citation): an assumption, not a recorded exam date. Jan 1 makes birth year = 1988 - age
# give back the recorded age when a reader assumes a Jan 1 birthday.
EXAM_YEAR = 1988
EXAM_DATE = f"{EXAM_YEAR}-01-01"
META = {"lastUpdated": "2024-01-01T00:00:00Z", "versionId": "1"}

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
LOCAL = "https://aipipe.dev/fhir/CodeSystem/uci-heart-disease"
CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


@dataclass(frozen=True)
class Code:
    system: str
    code: str
    display: str
    unit: str | None  # UCUM code; None for categorical and flag columns


# Only columns with an exact LOINC meaning use LOINC. The others (scores, flags, categories,
# and thalach, for which LOINC has no "maximum heart rate achieved during exercise test")
# use a local code system whose codes are the UCI column names.
OBSERVATION_CODES: Mapping[str, Code] = {
    "age": Code(LOINC, "30525-0", "Age", "a"),
    "trestbps": Code(LOINC, "8480-6", "Systolic blood pressure", "mm[Hg]"),
    "chol": Code(LOINC, "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL"),
    "cp": Code(
        LOCAL,
        "cp",
        "Chest pain type (1 typical angina, 2 atypical angina, 3 non-anginal, 4 asymptomatic)",
        None,
    ),
    "fbs": Code(LOCAL, "fbs", "Fasting blood sugar > 120 mg/dL (1 true, 0 false)", None),
    "restecg": Code(
        LOCAL,
        "restecg",
        "Resting ECG (0 normal, 1 ST-T wave abnormality, 2 left ventricular hypertrophy)",
        None,
    ),
    "thalach": Code(LOCAL, "thalach", "Maximum heart rate achieved during exercise", "/min"),
    "exang": Code(LOCAL, "exang", "Exercise induced angina (1 yes, 0 no)", None),
    "oldpeak": Code(LOCAL, "oldpeak", "ST depression induced by exercise relative to rest", "mm"),
    "slope": Code(LOCAL, "slope", "Slope of peak exercise ST segment (1 up, 2 flat, 3 down)", None),
    "ca": Code(LOCAL, "ca", "Number of major vessels (0-3) colored by fluoroscopy", None),
    "thal": Code(
        LOCAL, "thal", "Thallium scan (3 normal, 6 fixed defect, 7 reversible defect)", None
    ),
    "num": Code(
        LOCAL, "num", "Angiographic disease status (0 none, 1-4 > 50% diameter narrowing)", None
    ),
}
CAD = Code(SNOMED, "53741008", "Coronary arteriosclerosis (disorder)", None)
GENDER = {"1": "male", "0": "female"}

Resource = dict[str, Any]
Row = dict[str, str | None]


def parse_rows(path: Path) -> list[tuple[int, Row]]:
    """(1-based raw line number, column → raw text or None for `?`) for each line of a file."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(COLUMNS):
            raise ValueError(f"{path}:{line_no} has {len(fields)} fields, expected {len(COLUMNS)}")
        values = zip(COLUMNS, fields, strict=True)
        rows.append((line_no, {c: None if f == "?" else f for c, f in values}))
    return rows


def number(text: str) -> int | float:
    """Cleveland writes `63.0`, the others `63`: both become 63, so all sites read alike."""
    value = float(text)
    return int(value) if value.is_integer() else value


def coding(code: Code) -> dict[str, str]:
    return {"system": code.system, "code": code.code, "display": code.display}


def patient(pid: str, row: Row) -> Resource:
    resource: Resource = {"resourceType": "Patient", "id": pid, "meta": META}
    if row["sex"] is not None:
        resource["gender"] = GENDER[str(number(row["sex"]))]
    if row["age"] is not None:
        resource["birthDate"] = str(EXAM_YEAR - int(number(row["age"])))
    return resource


def observation(pid: str, column: str, text: str) -> Resource:
    code = OBSERVATION_CODES[column]
    quantity: dict[str, Any] = {"value": number(text)}
    if code.unit is not None:
        quantity.update(unit=code.unit, system=UCUM, code=code.unit)
    return {
        "resourceType": "Observation",
        "id": f"{pid}-{column}",
        "meta": META,
        "status": "final",
        "code": {"coding": [coding(code)]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": EXAM_DATE,
        "valueQuantity": quantity,
    }


def condition(pid: str) -> Resource:
    return {
        "resourceType": "Condition",
        "id": f"{pid}-cad",
        "meta": META,
        "clinicalStatus": {"coding": [{"system": CLINICAL_STATUS, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": VERIFICATION_STATUS, "code": "confirmed"}]},
        "code": {"coding": [coding(CAD)]},
        "subject": {"reference": f"Patient/{pid}"},
        "onsetDateTime": EXAM_DATE,
    }


def hospital_resources(hospital: str, rows: Sequence[tuple[int, Row]]) -> Iterator[Resource]:
    """Patient, then its Observations in column order, then its Condition when num > 0."""
    for line_no, row in rows:
        pid = f"{hospital}-{line_no:04d}"
        yield patient(pid, row)
        for column in OBSERVATION_CODES:
            text = row[column]
            if text is not None:
                yield observation(pid, column, text)
        num = row["num"]
        if num is not None and number(num) > 0:
            yield condition(pid)


def ndjson_line(resource: Resource) -> str:
    return json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"


def write_hospital(hospital: str, rows: Sequence[tuple[int, Row]], out_dir: Path) -> dict[str, int]:
    lines: dict[str, list[str]] = {"Patient": [], "Observation": [], "Condition": []}
    for resource in hospital_resources(hospital, rows):
        lines[resource["resourceType"]].append(ndjson_line(resource))
    folder = out_dir / hospital
    folder.mkdir(parents=True, exist_ok=True)
    for rtype, text in lines.items():
        # write_bytes: no platform newline translation, so the files are identical everywhere.
        (folder / f"{rtype}.ndjson").write_bytes("".join(text).encode("ascii"))
    return {f"{hospital}/{rtype}": len(text) for rtype, text in lines.items()}


def convert(src_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write the NDJSON of all four hospitals; returns `hospital/ResourceType` → count."""
    counts: dict[str, int] = {}
    for hospital in HOSPITALS:
        rows = parse_rows(src_dir / f"processed.{hospital}.data")
        counts.update(write_hospital(hospital, rows, out_dir))
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="raw UCI files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="NDJSON output folder")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"source folder {args.src} does not exist; pass --src")
    counts = convert(args.src, args.out)
    for key, count in counts.items():
        print(f"{key:28} {count:6}")


if __name__ == "__main__":
    main()
