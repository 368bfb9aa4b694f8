"""Each site carves a validation split out of its train split when the study personalizes
(issue 13): deterministic, recorded in the study, disjoint from test, and the test split is
exactly the one a study without personalization gets.

Real node store, the shipped Cleveland FHIR files, the real `extract`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aipipe.errors import StudyError
from aipipe.node.home import NodePaths, init_node, open_store
from aipipe.node.ingest import ingest_files
from aipipe.personalization import SiteData
from aipipe.study.blocks import Split
from aipipe.study.features import FeatureMatrix, extract
from aipipe.study.personal import Personalization
from aipipe.study.spec import StudySpec, load_study

ROOT = Path(__file__).resolve().parents[1]
HEART = ROOT / "examples" / "heart-disease"


@pytest.fixture(scope="module")
def cleveland(tmp_path_factory: pytest.TempPathFactory) -> NodePaths:
    paths = init_node(tmp_path_factory.mktemp("val") / "cleveland", "cleveland")
    store = open_store(paths)
    try:
        ingest_files(store, [HEART / "fhir" / "cleveland"])
    finally:
        store.close()
    return paths


def personalized(spec: StudySpec, fraction: float = 0.2, **split: object) -> StudySpec:
    block = Personalization(method="none", validation_fraction=fraction)
    update: dict[str, object] = {"personalization": block}
    if split:
        update["split"] = Split.model_validate(split)
    return spec.model_copy(update=update)


def extract_from(paths: NodePaths, spec: StudySpec) -> FeatureMatrix:
    store = open_store(paths)
    try:
        return extract(store, spec)
    finally:
        store.close()


def test_a_study_without_personalization_has_no_validation_split(cleveland: NodePaths) -> None:
    matrix = extract_from(cleveland, load_study(HEART / "study.yaml"))
    assert (len(matrix.train_ids), len(matrix.val_ids), len(matrix.test_ids)) == (199, 0, 104)


def test_the_seeded_validation_split_comes_out_of_train_and_leaves_test_alone(
    cleveland: NodePaths,
) -> None:
    spec = load_study(HEART / "study.yaml")
    plain = extract_from(cleveland, spec)
    matrix = extract_from(cleveland, personalized(spec))
    assert matrix.test_ids == plain.test_ids
    np.testing.assert_array_equal(matrix.x_test, plain.x_test)
    assert sorted(matrix.train_ids + matrix.val_ids) == sorted(plain.train_ids)
    assert len(matrix.val_ids) == 40  # ⌈0.2 × 199⌉, as sklearn's train_test_split counts
    assert not set(matrix.val_ids) & set(matrix.train_ids)
    assert matrix.cohort == plain.cohort and sorted(matrix.ids) == sorted(plain.ids)
    # The preprocessing is fitted on the whole train split, so the rows are the same rows.
    rows = {pid: row for pid, row in zip(plain.train_ids, plain.x_train, strict=True)}
    for pid, row in zip(matrix.val_ids, matrix.x_val, strict=True):
        np.testing.assert_array_equal(row, rows[pid])


def test_the_keyed_validation_split_is_deterministic_and_drawn_apart_from_test(
    cleveland: NodePaths,
) -> None:
    spec = personalized(load_study(HEART / "study.yaml"), method="keyed")
    first, again = extract_from(cleveland, spec), extract_from(cleveland, spec)
    assert first.val_ids == again.val_ids and first.train_ids == again.train_ids
    assert 0 < len(first.val_ids) < len(first.val_ids) + len(first.train_ids)
    wider = extract_from(cleveland, personalized(load_study(HEART / "study.yaml"), 0.5,
                                                 method="keyed"))  # fmt: skip
    assert wider.test_ids == first.test_ids  # the test side never moves
    assert set(first.val_ids) <= set(wider.val_ids)  # one draw per patient, two thresholds


def test_site_data_gives_a_personalizer_the_fit_and_validation_splits_only(
    cleveland: NodePaths,
) -> None:
    matrix = extract_from(cleveland, personalized(load_study(HEART / "study.yaml")))
    data = SiteData.of(matrix)
    assert data.x_fit.shape == (159, 13) and data.x_val.shape == (40, 13)
    assert not hasattr(data, "x_test")


def test_a_validation_split_that_takes_every_train_patient_is_refused(
    cleveland: NodePaths,
) -> None:
    spec = personalized(load_study(HEART / "study.yaml"), 0.999)
    with pytest.raises(StudyError, match="validation"):
        extract_from(cleveland, spec)


def test_the_personalization_block_changes_the_digest_and_its_absence_does_not() -> None:
    spec = load_study(HEART / "study.yaml")
    assert personalized(spec).digest() != spec.digest()
    assert spec.model_copy(update={"personalization": None}).digest() == spec.digest()
