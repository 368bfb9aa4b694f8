"""What a site learns from its train split to prepare rows: `Preprocessor` and its limits.

Fills for `impute`/`indicator` columns (the train mean or the study's value) and the z-score of
`standardize: site`: the train mean and unbiased std, the std floored (`std_floors`) so that a
column with little or no spread at a small site cannot put a patient a billion standard
deviations away; a patient scored later has each numeric value clipped to ±`Z_CLIP`
(`z_bounds`). Fitted by `aipipe.study.features` (`extract`, `site_preprocessor`), pooled at the
hub from DP statistics (aipipe.hub.cds), applied to patients scored (aipipe.cds.scoring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aipipe.study.spec import StudySpec

FloatArray = NDArray[np.float32]

# Scaling limits (`standardize: site`). A column's std is at least STD_FLOOR_FRACTION of its
# declared range's width (a feature's `range`; 0/1 for categorical and indicator columns and sex,
# 0-120 for age), or STD_FLOOR_ABSOLUTE in the feature's unit when it declares none. A patient
# scored later has each numeric column's z-score clipped to ±Z_CLIP: the model is not
# extrapolated beyond that (train rows are not clipped: FLamby parity; 0/1 columns never are,
# a rare category lies many SDs out). A site with fewer than MIN_TRAIN_ROWS train patients
# cannot estimate its scaling and scores no one (aipipe.cds.scoring refuses).
STD_FLOOR_FRACTION = 0.02
STD_FLOOR_ABSOLUTE = 1e-3
Z_CLIP = 5.0
MIN_TRAIN_ROWS = 5


def z_bounds(study: StudySpec) -> NDArray[np.float64]:
    """Each column's z-score bound for a patient scored: Z_CLIP for numeric values and age,
    none (inf) for 0/1 columns (categorical levels, missing indicators, sex)."""
    bounds: list[float] = []
    for feature in study.features:
        n = len(feature.columns())
        values = n - 1 if feature.missing == "indicator" else n
        numeric = feature.kind == "numeric"
        bounds += [Z_CLIP if numeric else math.inf] * values + [math.inf] * (n - values)
    bounds += [Z_CLIP if name == "age" else math.inf for name in study.demographics]
    return np.asarray(bounds, dtype=np.float64)


def std_floors(study: StudySpec) -> NDArray[np.float64]:
    """Each column's std floor: STD_FLOOR_FRACTION of its range's width, else the absolute."""
    floors: list[float] = []
    for feature in study.features:
        ranges = feature.column_ranges()
        if ranges is None:  # a numeric feature without a `range`
            floors.append(STD_FLOOR_ABSOLUTE)
            ranges = [(0.0, 1.0)] if feature.missing == "indicator" else []
        floors.extend(STD_FLOOR_FRACTION * (hi - lo) for lo, hi in ranges)
    demographic = {"age": 120.0, "sex": 1.0}
    floors.extend(STD_FLOOR_FRACTION * demographic[name] for name in study.demographics)
    return np.asarray(floors, dtype=np.float64)


@dataclass(frozen=True)
class Preprocessor:
    """What a site learned from its train split to prepare rows: fills for imputed columns and
    the z-score of `standardize: site`. Applied alike to train, test and patients scored later."""

    fills: dict[int, float]
    mean: NDArray[np.float64] | None
    std: NDArray[np.float64] | None  # already floored: the divisor itself
    # Fitted at a site: how many train rows, and the columns whose own std was below the floor
    # (no spread there). None/empty for a preprocessor pooled at the hub.
    train_rows: int | None = None
    flat: tuple[int, ...] = ()

    @classmethod
    def fit(
        cls,
        study: StudySpec,
        x_train: NDArray[np.float64],
        impute_cols: list[tuple[int, float | None]],
    ) -> Preprocessor:
        fills = {c: v if v is not None else _nanmean(x_train[:, c]) for c, v in impute_cols}
        rows = len(x_train)
        if study.preprocessing.standardize != "site":
            return cls(fills, None, None, rows)
        filled = cls(fills, None, None).apply(x_train).astype(np.float64)
        std = filled.std(axis=0, ddof=1) if rows > 1 else np.zeros(filled.shape[1])
        mean = filled.mean(axis=0) if rows else np.zeros(filled.shape[1])
        floors = std_floors(study)
        flat = tuple(int(c) for c in np.flatnonzero(std < floors))
        return cls(fills, mean, np.maximum(std, floors), rows, flat)

    def apply(
        self, x: NDArray[np.float64], bounds: NDArray[np.float64] | None = None
    ) -> FloatArray:
        """Fill and scale rows; `bounds` (`z_bounds`) clips each z-score to ±its bound."""
        out = x.copy()
        for column, fill in self.fills.items():
            out[np.isnan(out[:, column]), column] = fill
        if self.mean is not None and self.std is not None:
            out = (out - self.mean) / (self.std + 1e-9)
            if bounds is not None:
                out = np.clip(out, -bounds, bounds)
        return out.astype(np.float32)

    def problems(self) -> list[str]:
        """Why this site cannot scale any patient (empty: it can, or the study does not scale)."""
        scales = self.mean is not None and self.std is not None
        if scales and self.train_rows is not None and self.train_rows < MIN_TRAIN_ROWS:
            return [
                f"this site has {self.train_rows} train patient(s) for the study; at least "
                f"{MIN_TRAIN_ROWS} are needed to scale the model's inputs, so it scores no one"
            ]
        return []

    def off_scale(self, x_raw: NDArray[np.float64]) -> list[int]:
        """The columns in which one patient's row differs from a value that had no spread among
        the site's train patients: the site has no scale to put that difference on."""
        if self.mean is None or self.std is None:
            return []
        filled = x_raw.copy()
        for column, fill in self.fills.items():
            if np.isnan(filled[column]):
                filled[column] = fill
        return [c for c in self.flat if abs(filled[c] - self.mean[c]) > self.std[c]]


def _nanmean(column: NDArray[np.float64]) -> float:
    present = column[~np.isnan(column)]
    return float(present.mean()) if present.size else 0.0
