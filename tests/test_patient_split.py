"""The DP unit is a patient: each patient is put in train or test by a keyed hash of its
pseudonym and the study name (issue 10, item 6), so adding or deleting a patient moves no other.

Real node homes and stores, the shipped heart-disease FHIR files, the real `extract`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from aipipe.errors import StudyError
from aipipe.node.home import NodePaths, init_node, open_store
from aipipe.node.ingest import ingest_files
from aipipe.store.node_store import NodeStore
from aipipe.study.blocks import Split
from aipipe.study.features import FeatureMatrix, extract
from aipipe.study.spec import StudySpec, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]
HEART = ROOT / "examples" / "heart-disease"
CLEVELAND = HEART / "fhir" / "cleveland"


def default_split(spec: StudySpec) -> StudySpec:
    """The example study with the split a new study gets when it names none."""
    return spec.model_copy(update={"split": Split()})


def without_patient(source: Path, target: Path, patient_id: str) -> Path:
    """A copy of a site's NDJSON export in which one patient and everything about it is gone."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.ndjson")):
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            resource = json.loads(line)
            subject = resource.get("subject", {}).get("reference")
            if resource.get("id") == patient_id and resource["resourceType"] == "Patient":
                continue
            if subject == f"Patient/{patient_id}":
                continue
            kept.append(line)
        (target / path.name).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return target


def sides(matrix: FeatureMatrix) -> dict[str, str]:
    return {pid: "train" for pid in matrix.train_ids} | {pid: "test" for pid in matrix.test_ids}


@pytest.fixture(scope="module")
def cleveland(tmp_path_factory: pytest.TempPathFactory) -> tuple[NodePaths, Path]:
    work = tmp_path_factory.mktemp("split")
    paths = init_node(work / "cleveland", "cleveland")
    store = open_store(paths)
    try:
        report = ingest_files(store, [CLEVELAND])
        assert report.total("rejected") == 0
    finally:
        store.close()
    return paths, work


def extract_from(paths: NodePaths, spec: StudySpec) -> FeatureMatrix:
    store = open_store(paths)
    try:
        return extract(store, spec)
    finally:
        store.close()


def test_deleting_one_patient_moves_no_other_patient_between_train_and_test(
    cleveland: tuple[NodePaths, Path],
) -> None:
    paths, work = cleveland
    spec = default_split(load_study(HEART / "study.yaml"))
    before = sides(extract_from(paths, spec))
    gone = sorted(pid for pid, side in before.items() if side == "train")[0]
    # The same node (same pseudonym key) after the source dropped that patient, re-ingested.
    after_paths = init_node(work / "cleveland-after", "cleveland")
    shutil.copyfile(paths.pseudonym_key, after_paths.pseudonym_key)
    store = open_store(after_paths)
    try:
        ingest_files(store, [without_patient(CLEVELAND, work / "minus-one", gone)])
        after = sides(extract(store, spec))
    finally:
        store.close()

    moved = sorted(pid for pid, side in after.items() if before[pid] != side)
    assert set(after) == set(before) - {gone}
    assert moved == [], f"{len(moved)} of {len(after)} patients changed side"


def test_the_keyed_split_respects_the_test_fraction_within_binomial_tolerance(
    cleveland: tuple[NodePaths, Path],
) -> None:
    paths, _ = cleveland
    spec = default_split(load_study(HEART / "study.yaml"))

    matrix = extract_from(paths, spec)

    n, p = matrix.cohort, spec.split.test_fraction
    assert abs(len(matrix.test_ids) - p * n) <= 4 * math.sqrt(n * p * (1 - p))


def test_the_split_draws_are_uniform_and_depend_on_the_node_key_and_the_study(
    tmp_path: Path,
) -> None:
    ids = [f"patient-{i}" for i in range(20_000)]
    one = NodeStore.open(tmp_path / "one.sqlite", b"a" * 32)
    other = NodeStore.open(tmp_path / "other.sqlite", b"b" * 32)
    try:
        draws = np.asarray(one.split_draws("study-a", ids))
        again = np.asarray(one.split_draws("study-a", ids))
        other_study = np.asarray(one.split_draws("study-b", ids))
        other_node = np.asarray(other.split_draws("study-a", ids))
    finally:
        one.close()
        other.close()

    assert np.array_equal(draws, again)
    assert ((draws >= 0) & (draws < 1)).all()
    p, n = 0.34, len(ids)
    assert abs(int((draws < p).sum()) - p * n) <= 4 * math.sqrt(n * p * (1 - p))
    # Another study or another node draws independently: about p² of patients in test in both.
    for independent in (other_study, other_node):
        both = int(((draws < p) & (independent < p)).sum())
        assert abs(both - p * p * n) <= 4 * math.sqrt(n * p * p * (1 - p * p))


def test_the_keyed_split_is_the_default_and_the_flamby_split_is_explicit() -> None:
    example = load_study(HEART / "study.yaml")

    assert Split().method == "keyed"
    assert (example.split.method, example.split.seed, example.split.stratify) == (
        "seeded",
        43,
        True,
    )
    assert default_split(example).digest() != example.digest()


BASE: dict[str, Any] = {
    "name": "tiny",
    "cohort": {"label": {"conditions": ["snomed|44054006"]}},
    "features": [{"name": "glucose", "codes": ["loinc|2339-0"]}],
}


def test_a_study_file_with_a_seed_but_no_method_keeps_its_seeded_split() -> None:
    spec = parse_study(yaml.safe_dump({**BASE, "split": {"seed": 7, "stratify": False}}))

    assert (spec.split.method, spec.split.seed, spec.split.stratify) == ("seeded", 7, False)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"method": "keyed", "seed": 43}, "seed and stratify apply only to `method: seeded`"),
        ({"method": "seeded"}, "`method: seeded` needs a `seed`"),
    ],
)
def test_a_split_that_mixes_the_methods_is_refused(split: dict[str, Any], message: str) -> None:
    with pytest.raises(StudyError, match=message):
        parse_study(yaml.safe_dump({**BASE, "split": split}))


def patient_resources(pid: str, values: list[float]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": "1960-01-01"}
    ]
    for i, value in enumerate(values):
        out.append(
            {
                "resourceType": "Observation",
                "id": f"{pid}-o{i}",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                "subject": {"reference": f"Patient/{pid}"},
                "effectiveDateTime": f"2020-01-{i + 1:02d}",
                "valueQuantity": {"value": value, "unit": "mg/dL"},
            }
        )
    return out


def test_a_patient_with_many_records_is_one_row(tmp_path: Path) -> None:
    lines = [
        json.dumps(resource)
        for i in range(40)
        for resource in patient_resources(f"p{i}", [100.0 + j for j in range(1 + i % 5)])
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "all.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = init_node(tmp_path / "node", "node")
    store = open_store(paths)
    try:
        ingest_files(store, [tmp_path / "data"])
        matrix = extract(store, parse_study(yaml.safe_dump(BASE)))
    finally:
        store.close()

    ids = matrix.train_ids + matrix.test_ids
    assert sorted(ids) == sorted(f"p{i}" for i in range(40))
    assert len(ids) == len(set(ids)) == matrix.x_train.shape[0] + matrix.x_test.shape[0]


def test_a_keyed_split_that_leaves_a_side_empty_is_a_study_error(tmp_path: Path) -> None:
    lines = [json.dumps(r) for i in range(3) for r in patient_resources(f"p{i}", [100.0 + i])]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "all.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = init_node(tmp_path / "node", "node")
    store = open_store(paths)
    tiny = parse_study(yaml.safe_dump({**BASE, "split": {"test_fraction": 1e-6}}))
    try:
        ingest_files(store, [tmp_path / "data"])
        with pytest.raises(StudyError, match="keyed split of 3 patients put none in test"):
            extract(store, tiny)
    finally:
        store.close()
