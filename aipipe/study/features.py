"""Feature extraction: a study applied to a `NodeStore` gives train/test matrices.

The pipeline follows FLamby's Fed-Heart-Disease preprocessing where the study asks for it:
1. cohort = every patient in the store, ordered by id (deterministic): one row per patient, so
   the unit of the study's DP guarantee is a patient;
2. one raw value per (patient, feature) by the feature's aggregation, in the feature's unit;
3. rows missing a `drop` feature are removed (listwise deletion);
4. the split: by default each patient by a keyed hash of its pseudonym and the study name
   (`NodeStore.split_draws`; stable when patients come and go); `method: seeded` is FLamby's
   seeded split, stratified on the label when each class has more than 2 patients;
5. `impute`/`indicator` features filled with the train mean (or the study's value);
6. `standardize: site` z-scores every column with the train mean and unbiased std, the std
   floored (`std_floors`), so that a column with little or no spread at a small site cannot put
   a patient a billion standard deviations away; a patient scored later has each numeric value
   clipped to ±`Z_CLIP` (`z_bounds`).

Patients outside the study's `population` (aipipe.study.population) are dropped like rows
missing a `drop` feature, and only observations inside a feature's look-back window are read.
Steps 1-3 read the store (aipipe.study.raw); 5-6 are the `Preprocessor`
(aipipe.study.preprocessing) fitted on the train side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from aipipe.errors import StudyError
from aipipe.store.node_store import NodeStore
from aipipe.study.preprocessing import FloatArray, Preprocessor
from aipipe.study.raw import RawMatrix, raw_matrix
from aipipe.study.spec import StudySpec


@dataclass
class FeatureMatrix:
    columns: list[str]
    x_train: FloatArray
    y_train: FloatArray
    x_test: FloatArray
    y_test: FloatArray
    train_ids: list[str]
    test_ids: list[str]
    patients: int
    preprocessor: Preprocessor
    missing: dict[str, float] = field(default_factory=dict)
    unconverted: dict[str, int] = field(default_factory=dict)
    # The validation split (a study with a `personalization:` block): carved out of the train
    # split after the preprocessing was fitted on all of it; `x_train` is then the rest.
    x_val: FloatArray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    y_val: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    val_ids: list[str] = field(default_factory=list)

    @property
    def cohort(self) -> int:
        return len(self.train_ids) + len(self.val_ids) + len(self.test_ids)

    @property
    def ids(self) -> list[str]:
        """Every patient of the study at this site: train, validation and test."""
        return [*self.train_ids, *self.val_ids, *self.test_ids]

    def summary(self) -> dict[str, object]:
        labels = np.concatenate([self.y_train, self.y_val, self.y_test])
        return {
            "cohort": self.cohort,
            "train": len(self.train_ids),
            "validation": len(self.val_ids),
            "test": len(self.test_ids),
            "prevalence": round(float(labels.mean()), 4) if labels.size else 0.0,
            "patients": self.patients,
            "dropped": self.patients - self.cohort,
            "features": self.columns,
            "missing": self.missing,
            "unconverted_units": self.unconverted,
        }


def extract(store: NodeStore, study: StudySpec) -> FeatureMatrix:
    raw = raw_matrix(store, study)
    keep = np.flatnonzero(~raw.drop_mask)
    kept_ids = [raw.ids[i] for i in keep]
    if len(kept_ids) < 2:
        raise StudyError(
            f"study '{study.name}' keeps {len(kept_ids)} of {len(raw.ids)} patients after "
            "dropping rows with missing features or outside the study's population; use "
            "`missing: impute` for sparse features"
        )
    y = raw.y[keep]
    split = study.split
    if split.method == "keyed":
        draws = np.asarray(store.split_draws(study.name, kept_ids), dtype=np.float64)
        indices = keyed_split_indices(draws, split.test_fraction)
    else:
        assert split.seed is not None  # the spec refuses `seeded` without one
        stratify = True if split.stratify is None else split.stratify
        indices = split_indices(y, split.test_fraction, split.seed, stratify)
    matrix = _finish(study, raw, raw.x[keep], y, kept_ids, indices)
    if study.personalization is not None:
        matrix = carve_validation(store, study, matrix)
    return matrix


def site_preprocessor(store: NodeStore, study: StudySpec) -> Preprocessor:
    """The site's train preprocessing, to score patients with: fitted on the train side of the
    split as `extract` fits it, but without needing a test side (a tiny site's keyed split may
    leave it empty). A site with too few train patients gets a preprocessor that says so
    (`Preprocessor.problems`), never an error here."""
    raw = raw_matrix(store, study)
    keep = np.flatnonzero(~raw.drop_mask)
    kept_ids = [raw.ids[i] for i in keep]
    x = raw.x[keep]
    split = study.split
    if split.method == "keyed" and kept_ids:
        draws = np.asarray(store.split_draws(study.name, kept_ids), dtype=np.float64)
        train_idx = np.flatnonzero(draws >= split.test_fraction)
    elif len(kept_ids) >= 2:
        assert split.seed is not None
        stratify = True if split.stratify is None else split.stratify
        try:
            train_idx = split_indices(raw.y[keep], split.test_fraction, split.seed, stratify)[0]
        except StudyError:
            train_idx = np.arange(0)
    else:
        train_idx = np.arange(0)
    return Preprocessor.fit(study, x[train_idx], raw.impute_cols)


def _finish(
    study: StudySpec,
    raw: RawMatrix,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    kept_ids: list[str],
    indices: tuple[NDArray[np.intp], NDArray[np.intp]],
) -> FeatureMatrix:
    train_idx, test_idx = indices
    preprocessor = Preprocessor.fit(study, x[train_idx], raw.impute_cols)
    return FeatureMatrix(
        columns=study.columns(),
        x_train=preprocessor.apply(x[train_idx]),
        y_train=y[train_idx].astype(np.float32),
        x_test=preprocessor.apply(x[test_idx]),
        y_test=y[test_idx].astype(np.float32),
        train_ids=[kept_ids[i] for i in train_idx],
        test_ids=[kept_ids[i] for i in test_idx],
        patients=len(raw.ids),
        preprocessor=preprocessor,
        missing=raw.missing,
        unconverted=raw.unconverted,
    )


def carve_validation(store: NodeStore, study: StudySpec, matrix: FeatureMatrix) -> FeatureMatrix:
    """Move `personalization.validation_fraction` of the train split to a validation split,
    deterministically: by a keyed draw independent of the test split's (the study name with
    `/validation`, which no study name can be) under `method: keyed`, at least one patient; by
    FLamby's seeded split of the train rows with seed + 1 under `method: seeded`. Personal
    checkpoints and hyper-parameters are chosen on it, never on the test split."""
    assert study.personalization is not None
    fraction = study.personalization.validation_fraction
    n = len(matrix.train_ids)
    if n < 2:
        raise StudyError(
            f"study '{study.name}' has {n} train patient(s) at this site: a validation split "
            "needs at least 2; add patients or remove the `personalization:` block"
        )
    split = study.split
    if split.method == "keyed":
        draws = np.asarray(store.split_draws(f"{study.name}/validation", matrix.train_ids))
        in_val = draws < fraction
        if not in_val.any():
            in_val[int(np.argmin(draws))] = True
        fit_idx, val_idx = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    else:
        assert split.seed is not None
        stratify = True if split.stratify is None else split.stratify
        try:
            fit_idx, val_idx = split_indices(
                matrix.y_train.astype(np.float64), fraction, split.seed + 1, stratify
            )
        except StudyError:
            fit_idx = np.arange(0)
    if len(fit_idx) == 0:
        raise StudyError(
            f"study '{study.name}': the validation split took every train patient at this "
            f"site ({n}); lower personalization.validation_fraction ({fraction})"
        )
    ids = matrix.train_ids
    return replace(
        matrix,
        x_train=matrix.x_train[fit_idx],
        y_train=matrix.y_train[fit_idx],
        train_ids=[ids[i] for i in fit_idx],
        x_val=matrix.x_train[val_idx],
        y_val=matrix.y_train[val_idx],
        val_ids=[ids[i] for i in val_idx],
    )


def keyed_split_indices(
    draws: NDArray[np.float64], test_fraction: float
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """The keyed split: a patient is in test when its draw (`NodeStore.split_draws`) is below
    `test_fraction`. Each side is non-empty, or the cohort is too small for the study."""
    in_test = draws < test_fraction
    n_test = int(in_test.sum())
    if n_test == 0 or n_test == len(draws):
        side = "test" if n_test == 0 else "train"
        raise StudyError(
            f"the keyed split of {len(draws)} patients put none in {side} "
            f"(test_fraction={test_fraction}); each patient's side is drawn on its own, so a "
            "cohort this small needs more patients or a test_fraction nearer 0.5"
        )
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def split_indices(
    y: NDArray[np.float64], test_fraction: float, seed: int, stratify: bool
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """FLamby's split: sklearn's train_test_split over arange(n), stratified when each class
    has more than 2 members (Switzerland's single negative makes its split unstratified)."""
    counts = np.bincount(y.astype(np.int64), minlength=2)
    use_strata = stratify and bool((counts > 2).all())
    n_test = math.ceil(test_fraction * len(y))
    if n_test < 1 or n_test >= len(y):
        raise StudyError(
            f"a cohort of {len(y)} patients cannot be split with test_fraction={test_fraction}: "
            "both train and test need at least one patient"
        )
    if use_strata and n_test < 2:
        use_strata = False  # a stratified test split needs a row of each class
    train, test = train_test_split(
        np.arange(len(y)),
        train_size=round(1 - test_fraction, 10),
        test_size=test_fraction,
        random_state=seed,
        shuffle=True,
        stratify=y if use_strata else None,
    )
    return np.asarray(train), np.asarray(test)
