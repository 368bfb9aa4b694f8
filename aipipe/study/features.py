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
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from datetime import date

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from aipipe.errors import StudyError
from aipipe.fhir.codes import convert_unit
from aipipe.store.node_store import NodeStore
from aipipe.study.population import ages, exclusions, window_start
from aipipe.study.spec import Feature, StudySpec

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

    @property
    def cohort(self) -> int:
        return len(self.train_ids) + len(self.test_ids)

    def summary(self) -> dict[str, object]:
        labels = np.concatenate([self.y_train, self.y_test])
        return {
            "cohort": self.cohort,
            "train": len(self.train_ids),
            "test": len(self.test_ids),
            "prevalence": round(float(labels.mean()), 4) if labels.size else 0.0,
            "patients": self.patients,
            "dropped": self.patients - self.cohort,
            "features": self.columns,
            "missing": self.missing,
            "unconverted_units": self.unconverted,
        }


@dataclass
class RawMatrix:
    """Every patient's encoded feature values before dropping, splitting and scaling.

    NaN marks a missing value. `drop_mask` marks patients missing a `drop` feature (or a
    demographic); `impute_cols` lists the columns an `impute`/`indicator` policy fills, with the
    study's fill value (None: the train mean).
    """

    ids: list[str]
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    drop_mask: NDArray[np.bool_]
    impute_cols: list[tuple[int, float | None]]
    missing: dict[str, float]
    unconverted: dict[str, int]
    excluded: dict[str, str] = field(default_factory=dict)


def raw_matrix(store: NodeStore, study: StudySpec) -> RawMatrix:
    """The study's encoded features for every patient in the store, ordered by patient id."""
    conn = store.conn
    ids = [row[0] for row in conn.execute("SELECT id FROM patients ORDER BY id")]
    if not ids:
        raise StudyError("the node store has no patients; ingest data first: aipipe node ingest")
    index = {pid: i for i, pid in enumerate(ids)}
    blocks: list[NDArray[np.float64]] = []
    drop_mask = np.zeros(len(ids), dtype=bool)
    missing: dict[str, float] = {}
    unconverted: dict[str, int] = {}
    impute_cols: list[tuple[int, float | None]] = []
    col = 0
    for feature in study.features:
        since = window_start(study, feature, study.reference_date)
        values, skipped = _feature_values(conn, feature, index, study.reference_date, since)
        missing[feature.name] = round(float(np.isnan(values).mean()), 4)
        if skipped:
            unconverted[feature.name] = skipped
        block, n_value_cols = _encode(feature, values)
        if feature.missing == "drop":
            drop_mask |= np.isnan(values)
        else:
            impute_cols.extend((c, feature.impute) for c in range(col, col + n_value_cols))
        blocks.append(block)
        col += block.shape[1]
    for name in study.demographics:
        values = ages(conn, index, study.reference_date) if name == "age" else _sex(conn, index)
        missing[name] = round(float(np.isnan(values).mean()), 4)
        drop_mask |= np.isnan(values)
        blocks.append(values[:, None])
    excluded = exclusions(conn, study, study.reference_date)
    drop_mask |= np.array([pid in excluded for pid in ids], dtype=bool)
    x = np.concatenate(blocks, axis=1).astype(np.float64)
    return RawMatrix(
        ids, x, _labels(conn, study, index), drop_mask, impute_cols, missing, unconverted, excluded
    )


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
    return _finish(study, raw, raw.x[keep], y, kept_ids, indices)


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


def _nanmean(column: NDArray[np.float64]) -> float:
    present = column[~np.isnan(column)]
    return float(present.mean()) if present.size else 0.0


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


def _code_filter(feature_codes: list[str]) -> tuple[str, list[str]]:
    exact = [c for c in feature_codes if not c.endswith("*")]
    prefixes = [c[:-1] for c in feature_codes if c.endswith("*")]
    clauses = []
    params: list[str] = []
    if exact:
        clauses.append(f"code IN ({','.join('?' * len(exact))})")
        params.extend(exact)
    for prefix in prefixes:
        clauses.append("substr(code, 1, ?) = ?")
        params.extend([str(len(prefix)), prefix])
    return "(" + " OR ".join(clauses) + ")", params


def _feature_values(
    conn: sqlite3.Connection,
    feature: Feature,
    index: dict[str, int],
    reference: date | None,
    since: date | None = None,
) -> tuple[NDArray[np.float64], int]:
    """One value per patient (NaN where none), and how many values had an unconvertible unit."""
    where, params = _code_filter(feature.all_codes())
    sql = (
        "SELECT patient_id, code, value, unit, effective FROM observations "
        f"WHERE {where} AND value IS NOT NULL"
    )
    if reference is not None:
        sql += " AND (effective IS NULL OR substr(effective, 1, 10) <= ?)"
        params.append(reference.isoformat())
    if since is not None:  # the look-back window: undated values are not known to be recent
        sql += " AND substr(effective, 1, 10) >= ?"
        params.append(since.isoformat())
    sql += " ORDER BY patient_id, effective, resource_id, component"
    per_patient: dict[str, list[float]] = {}
    target = feature.target_unit()
    skipped = 0
    for patient, code, value, unit, _ in conn.execute(sql, params):
        if patient not in index:
            continue
        if target is not None:
            value = convert_unit(value, unit, target, code)
            if value is None:
                skipped += 1
                continue
        per_patient.setdefault(patient, []).append(float(value))
    out = np.full(len(index), np.nan)
    for patient, values in per_patient.items():
        out[index[patient]] = _aggregate(feature.aggregation, values)
    return out, skipped


def _aggregate(how: str, values: list[float]) -> float:
    if how == "latest":
        return values[-1]
    if how == "mean":
        return float(np.mean(values))
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    return float(len(values))


def _encode(feature: Feature, values: NDArray[np.float64]) -> tuple[NDArray[np.float64], int]:
    """The feature's columns, and how many of them are value columns (not the indicator)."""
    if feature.kind == "categorical":
        assert feature.levels is not None
        levels = feature.levels[1:] if feature.drop_first else feature.levels
        block = np.stack([(values == level).astype(np.float64) for level in levels], axis=1)
        block[np.isnan(values)] = np.nan
    else:
        block = values[:, None].copy()
    n_value_cols = block.shape[1]
    if feature.missing == "indicator":
        block = np.concatenate([block, np.isnan(values)[:, None].astype(np.float64)], axis=1)
    return block, n_value_cols


def _sex(conn: sqlite3.Connection, index: dict[str, int]) -> NDArray[np.float64]:
    out = np.full(len(index), np.nan)
    for pid, sex in conn.execute("SELECT id, sex FROM patients"):
        out[index[pid]] = {"male": 1.0, "female": 0.0}.get(sex or "", np.nan)
    return out


def _labels(
    conn: sqlite3.Connection, study: StudySpec, index: dict[str, int]
) -> NDArray[np.float64]:
    where, params = _code_filter(list(study.cohort.label.conditions))
    sql = f"SELECT DISTINCT patient_id FROM conditions WHERE {where}"
    window = study.cohort.label.window
    if window is not None and window.start is not None:
        sql += " AND substr(onset, 1, 10) >= ?"
        params.append(window.start.isoformat())
    if window is not None and window.end is not None:
        sql += " AND substr(onset, 1, 10) <= ?"
        params.append(window.end.isoformat())
    y = np.zeros(len(index))
    for (pid,) in conn.execute(sql, params):
        if pid in index:
            y[index[pid]] = 1.0
    return y
