"""FLamby's Fed-Heart-Disease counts, proven through the FHIR path: raw UCI files → convert.py
→ FHIR NDJSON → `node ingest` → `extract` with examples/heart-disease/study.yaml."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import ingest_files
from aipipe.study.features import FeatureMatrix, extract
from aipipe.study.spec import load_study
from tests.heart_convert_support import HOSPITALS, RAW, _load_converter, needs_raw

STUDY = Path(__file__).resolve().parents[1] / "examples" / "heart-disease" / "study.yaml"
# FLamby's per-centre train/test sizes (heart_disease/README.md, step 4).
EXPECTED = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16),
            "va": (85, 45)}  # fmt: skip


@pytest.fixture(scope="module")
def matrices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FeatureMatrix]:
    work = tmp_path_factory.mktemp("flamby")
    _load_converter().convert(RAW, work / "fhir")
    spec = load_study(STUDY)
    out = {}
    for hospital in HOSPITALS:
        store = open_store(init_node(work / hospital, hospital))
        try:
            report = ingest_files(store, [work / "fhir" / hospital])
            assert report.total("rejected") == 0
            out[hospital] = extract(store, spec)
        finally:
            store.close()
    return out


@needs_raw
@pytest.mark.parametrize("hospital", HOSPITALS)
def test_each_centre_keeps_flambys_rows_and_split_sizes(
    matrices: dict[str, FeatureMatrix], hospital: str
) -> None:
    matrix = matrices[hospital]

    assert (len(matrix.train_ids), len(matrix.test_ids)) == EXPECTED[hospital]
    assert matrix.x_train.shape[1] == 13


@needs_raw
def test_train_and_test_patients_are_the_rederived_flamby_assignment(
    matrices: dict[str, FeatureMatrix],
) -> None:
    expected: dict[str, set[str]] = {}
    with (RAW / "flamby_split_rederived.csv").open() as handle:
        for row in csv.DictReader(handle):
            pid = f"{row['center_name']}-{int(row['raw_line']):04d}"
            expected.setdefault(f"{row['center_name']}/{row['set']}", set()).add(pid)

    for hospital, matrix in matrices.items():
        assert set(matrix.train_ids) == expected[f"{hospital}/train"]
        assert set(matrix.test_ids) == expected[f"{hospital}/test"]


@needs_raw
def test_labels_are_flambys_binarised_num_for_every_patient(
    matrices: dict[str, FeatureMatrix],
) -> None:
    expected: dict[str, float] = {}
    with (RAW / "flamby_split_rederived.csv").open() as handle:
        for row in csv.DictReader(handle):
            expected[f"{row['center_name']}-{int(row['raw_line']):04d}"] = float(row["y_binary"])

    for matrix in matrices.values():
        observed = dict(
            zip(
                matrix.train_ids + matrix.test_ids,
                np.concatenate([matrix.y_train, matrix.y_test]),
                strict=True,
            )
        )
        assert observed == {pid: expected[pid] for pid in observed}


@needs_raw
def test_train_columns_are_standardised_per_centre(matrices: dict[str, FeatureMatrix]) -> None:
    matrix = matrices["cleveland"]

    assert np.allclose(matrix.x_train.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(matrix.x_train.std(axis=0, ddof=1), 1, atol=1e-3)
