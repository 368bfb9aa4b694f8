"""A study's values read from a `NodeStore`: one encoded row per patient (`raw_matrix`).

Every patient in the store, ordered by id; one raw value per (patient, feature) by the feature's
aggregation, in the feature's unit, from observations inside the feature's look-back window
(aipipe.study.population); categorical features one-hot encoded, `indicator` features with their
missing column; demographics; the label from the cohort's condition codes and onset window. It
marks the rows to drop (missing a `drop` feature or a demographic, or outside the population) and
the columns to fill, but drops, splits and scales nothing: that is `aipipe.study.features`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import date

import numpy as np
from numpy.typing import NDArray

from aipipe.errors import StudyError
from aipipe.fhir.codes import convert_unit
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.store.node_store import NodeStore, field_label
from aipipe.study.blocks import Feature
from aipipe.study.population import ages, exclusions, window_start
from aipipe.study.spec import StudySpec


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
        values, skipped = _feature_values(
            conn, feature, index, study.reference_date, since, store.at_rest
        )
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
        if name == "age":
            values = ages(conn, index, study.reference_date, store.at_rest)
        else:
            values = _sex(conn, index, store.at_rest)
        missing[name] = round(float(np.isnan(values).mean()), 4)
        drop_mask |= np.isnan(values)
        blocks.append(values[:, None])
    excluded = exclusions(conn, study, study.reference_date, store.at_rest)
    drop_mask |= np.array([pid in excluded for pid in ids], dtype=bool)
    x = np.concatenate(blocks, axis=1).astype(np.float64)
    return RawMatrix(
        ids, x, _labels(conn, study, index), drop_mask, impute_cols, missing, unconverted, excluded
    )


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
    at_rest: AtRest = PLAIN,
) -> tuple[NDArray[np.float64], int]:
    """One value per patient (NaN where none), and how many values had an unconvertible unit;
    the values and units opened with `at_rest` where the home seals them."""
    where, params = _code_filter(feature.all_codes())
    sql = (
        "SELECT patient_id, code, value, unit, resource_id, component FROM observations "
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
    for patient, code, sealed_value, sealed_unit, rid, component in conn.execute(sql, params):
        if patient not in index:
            continue
        opened, unit = (
            at_rest.open_field(sealed, field_label("observations", (rid, component, code), col),
                               where=f"Observation/{rid} {col}")
            for col, sealed in (("value", sealed_value), ("unit", sealed_unit))
        )  # fmt: skip
        if opened is None:  # not reached: the query asks for `value IS NOT NULL`
            continue
        value = float(opened)
        if target is not None:
            converted = convert_unit(value, None if unit is None else str(unit), target, code)
            if converted is None:
                skipped += 1
                continue
            value = converted
        per_patient.setdefault(patient, []).append(value)
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


def _sex(
    conn: sqlite3.Connection, index: dict[str, int], at_rest: AtRest = PLAIN
) -> NDArray[np.float64]:
    out = np.full(len(index), np.nan)
    for pid, sealed in conn.execute("SELECT id, sex FROM patients"):
        label = field_label("patients", (pid,), "sex")
        sex = at_rest.open_field(sealed, label, where=f"Patient/{pid} sex")
        out[index[pid]] = {"male": 1.0, "female": 0.0}.get(str(sex or ""), np.nan)
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
