"""`PatientScorer`: a patient's FHIR resources → a risk probability, its drivers, what is missing.

The features come from the code that trains the model: the resources go into an in-memory
`NodeStore`, `raw_matrix` encodes them and the site's `Preprocessor` fills and scales them, so a
patient scored here goes through exactly the transformation the model was trained on. The stores
are emptied and reused (a small pool), because creating the schema costs more than the scoring.

What drove a score is gradient × input on the logit. For the logistic model that is exactly
weight × standardized value, a term of the logit itself; for an MLP it is the usual first-order
attribution (Simonyan et al. 2014; Shrikumar et al. 2016), not an exact decomposition.
"""

from __future__ import annotations

import math
import os
import queue
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

import numpy as np
import sqlite_utils
import torch
from numpy.typing import NDArray

from aipipe.cds import evidence
from aipipe.cds.evidence import CodeSet, ObsRow
from aipipe.fhir.mapping import MappedResource, ResourceRejected, map_resource
from aipipe.models import arrays_to_model
from aipipe.personalization import personalizer_for
from aipipe.store.node_store import NodeStore
from aipipe.store.schema import migrate
from aipipe.study.population import window_start
from aipipe.study.preprocessing import Preprocessor, z_bounds
from aipipe.study.raw import raw_matrix
from aipipe.study.spec import StudySpec

_DERIVED_TABLES = ("resources", "patients", "observations", "conditions", "medications")


@dataclass(frozen=True)
class FeatureValue:
    """A feature as the model saw it: the raw value (in the feature's unit), or the fill used."""

    name: str
    value: float | None
    unit: str | None
    imputed: bool
    basis: tuple[str, ...] = ()


@dataclass(frozen=True)
class MissingFeature:
    """A feature with no usable value; `blocking` when its policy is `drop` (or a demographic)."""

    name: str
    reason: str
    blocking: bool


@dataclass(frozen=True)
class Driver:
    """One model input's share of the logit: > 0 raises the risk, < 0 lowers it."""

    column: str
    feature: str
    value: float | None
    contribution: float


@dataclass(frozen=True)
class ScoreResult:
    study: str
    model_version: str
    patient_id: str | None
    probability: float | None
    values: tuple[FeatureValue, ...] = ()
    drivers: tuple[Driver, ...] = ()
    basis: tuple[str, ...] = ()
    missing: tuple[MissingFeature, ...] = ()
    problems: tuple[str, ...] = ()
    uses_demographics: bool = False

    @property
    def scored(self) -> bool:
        return self.probability is not None

    @property
    def blocking(self) -> tuple[MissingFeature, ...]:
        return tuple(m for m in self.missing if m.blocking)


class PatientScorer:
    """Scores single patients with one model version of one study."""

    def __init__(
        self,
        study: StudySpec,
        weights: Mapping[str, np.ndarray],
        preprocessor: Preprocessor,
        model_version: str,
        *,
        top_drivers: int = 3,
    ) -> None:
        columns = study.columns()
        for name, array in (("mean", preprocessor.mean), ("std", preprocessor.std)):
            if array is not None and array.shape != (len(columns),):
                raise ValueError(
                    f"preprocessor {name} has shape {array.shape}; study '{study.name}' has "
                    f"{len(columns)} columns"
                )
        # The study's architecture as its personalization method builds it (FENDA's two
        # extractors), so a site's personal model loads as the global one does.
        model = arrays_to_model(weights, personalizer_for(study).build(len(columns)))
        model.eval()
        self.study = study
        self.model_version = model_version
        self._model = model
        self._preprocessor = preprocessor
        self._bounds = z_bounds(study)
        self._columns = columns
        self._owners = [f.name for f in study.features for _ in f.columns()] + list(
            study.demographics
        )
        self._top = top_drivers
        self._codes = {f.name: CodeSet(f.all_codes()) for f in study.features}
        # The logistic model in NumPy: ~10 µs a patient, where a torch forward and backward
        # pass costs ~300 µs. The torch model above still checked the weights.
        self._linear = (
            (np.asarray(weights["head.weight"], np.float64)[0], float(weights["head.bias"][0]))
            if study.model.kind == "logistic" and set(weights) == {"head.weight", "head.bias"}
            else None
        )
        self._pool: queue.SimpleQueue[NodeStore] = queue.SimpleQueue()

    def score(
        self,
        resources: Iterable[Mapping[str, Any]],
        *,
        patient_id: str | None = None,
        as_of: date | None = None,
    ) -> ScoreResult:
        """Score the patient the resources describe (`patient_id`, or the one Patient given).

        `as_of` caps the observations read and dates age, as the study's `reference_date` does in
        training; None keeps the study's own. Never raises for missing or unusable data: the
        result then has no probability and says what is missing.
        """
        mapped, problems = _map_all(resources)
        patients = {m.id for m in mapped if m.type == "Patient"}
        pid = patient_id if patient_id is not None else next(iter(patients), None)
        if pid is None or pid not in patients or (patient_id is None and len(patients) > 1):
            problems.append("no single Patient resource for the patient to score")
            return self._unscored(pid, problems=problems)
        kept = [
            m for m in mapped if m.patient_id == pid or (m.type != "Patient" and not m.patient_id)
        ]
        if len(kept) < len(mapped):
            problems.append(f"{len(mapped) - len(kept)} resources of other patients ignored")
        study = (
            self.study if as_of is None else self.study.model_copy(update={"reference_date": as_of})
        )
        with self._store() as store:
            store.write_batch(kept)
            raw = raw_matrix(store, study)
            rows = [
                ObsRow(*row)
                for row in store.conn.execute(
                    "SELECT resource_id, component, code, value, unit, effective FROM observations "
                    "WHERE patient_id = ? ORDER BY effective, resource_id, component",
                    (pid,),
                )
            ]
        x_raw = raw.x[raw.ids.index(pid)]
        values, missing = self._describe(study, x_raw, rows)
        missing = _too_few_inputs(study, missing, problems)
        basis = tuple(sorted({rid for v in values for rid in v.basis}))
        refusals = self._refusals(pid, raw.excluded, x_raw)
        if refusals or any(m.blocking for m in missing):
            return self._unscored(pid, values, missing, [*refusals, *problems], basis)
        x = self._preprocessor.apply(x_raw[None, :], self._bounds)
        probability, contributions = self._forward(x)
        return ScoreResult(
            study=study.name,
            model_version=self.model_version,
            patient_id=pid,
            probability=probability,
            values=tuple(values),
            drivers=self._drivers(contributions, values),
            basis=basis,
            missing=tuple(missing),
            problems=tuple(problems),
            uses_demographics=bool(study.demographics),
        )

    # -- pieces -----------------------------------------------------------------------------

    def _refusals(
        self, pid: str, excluded: Mapping[str, str], x_raw: NDArray[np.float64]
    ) -> list[str]:
        """Why the model must not score this patient here: outside the study's population, or
        inputs this site cannot scale (too few train patients; a value where the site had none
        of the spread a z-score needs)."""
        if pid in excluded:
            return [f"outside the study's population: {excluded[pid]}"]
        site = self._preprocessor.problems()
        if site:
            return site
        flat = self._preprocessor.off_scale(x_raw)
        if flat:
            names = ", ".join(self._columns[c] for c in flat)
            return [
                f"this site's train patients show no spread in {names}, and this patient's "
                "value differs: the site cannot scale it, so the model is not applied"
            ]
        return []

    def _unscored(
        self,
        pid: str | None,
        values: Sequence[FeatureValue] = (),
        missing: Sequence[MissingFeature] = (),
        problems: Sequence[str] = (),
        basis: tuple[str, ...] = (),
    ) -> ScoreResult:
        return ScoreResult(
            study=self.study.name,
            model_version=self.model_version,
            patient_id=pid,
            probability=None,
            values=tuple(values),
            basis=basis,
            missing=tuple(missing),
            problems=tuple(problems),
            uses_demographics=bool(self.study.demographics),
        )

    @contextmanager
    def _store(self) -> Iterator[NodeStore]:
        try:
            store = self._pool.get_nowait()
        except queue.Empty:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            migrate(conn)
            store = NodeStore(sqlite_utils.Database(conn), os.urandom(32))
        try:
            yield store
        finally:
            try:
                for table in _DERIVED_TABLES:
                    store.conn.execute(f"DELETE FROM {table}")
            except sqlite3.Error:
                store.close()
            else:
                self._pool.put(store)

    def _describe(
        self, study: StudySpec, x_raw: NDArray[np.float64], rows: list[ObsRow]
    ) -> tuple[list[FeatureValue], list[MissingFeature]]:
        values: list[FeatureValue] = []
        missing: list[MissingFeature] = []
        col = 0
        for feature in study.features:
            width = len(feature.columns())
            n_values = width - (1 if feature.missing == "indicator" else 0)
            block = x_raw[col : col + n_values]
            unit = feature.target_unit()
            codes = self._codes[feature.name]
            matching = [r for r in rows if codes.matches(r.code)]
            since = window_start(study, feature, study.reference_date)
            if not np.isnan(block).any():
                read = evidence.usable(feature, matching, study.reference_date, since)
                value = evidence.decode(feature, block)
                values.append(
                    FeatureValue(feature.name, value, unit, False, evidence.basis(feature, read))
                )
            else:
                reason = evidence.missing_reason(feature, matching, study.reference_date, since)
                missing.append(MissingFeature(feature.name, reason, feature.missing == "drop"))
                fill = self._preprocessor.fills.get(col)
                imputed = feature.missing != "drop"
                shown = fill if imputed and feature.kind == "numeric" else None
                values.append(FeatureValue(feature.name, shown, unit, imputed))
            col += width
        for offset, name in enumerate(study.demographics):
            value = float(x_raw[col + offset])
            if np.isnan(value):
                reason = (
                    "Patient.gender is not male or female"
                    if name == "sex"
                    else ("Patient.birthDate is missing")
                )
                missing.append(MissingFeature(name, reason, True))
                values.append(FeatureValue(name, None, None, False))
            else:
                values.append(FeatureValue(name, value, "a" if name == "age" else None, False))
        return values, missing

    def _forward(self, x: NDArray[np.float32]) -> tuple[float, NDArray[np.float64]]:
        if self._linear is not None:
            weight, bias = self._linear
            contributions = weight * x[0].astype(np.float64)
            return _sigmoid(float(contributions.sum()) + bias), contributions
        inputs = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
        logit = self._model(inputs).sum()
        (gradient,) = torch.autograd.grad(logit, inputs)
        probability = float(torch.sigmoid(logit.detach()))
        contributions = (gradient * inputs.detach()).numpy()[0].astype(np.float64)
        return probability, contributions

    def _drivers(
        self, contributions: NDArray[np.float64], values: list[FeatureValue]
    ) -> tuple[Driver, ...]:
        by_name = {v.name: v.value for v in values}
        order = np.argsort(-np.abs(contributions), kind="stable")[: self._top]
        return tuple(
            Driver(
                column=self._columns[i],
                feature=self._owners[i],
                value=by_name.get(self._owners[i]),
                contribution=float(contributions[i]),
            )
            for i in order
        )


def _too_few_inputs(
    study: StudySpec, missing: list[MissingFeature], problems: list[str]
) -> list[MissingFeature]:
    """More than half of the model's inputs (features and demographics) without a value of the
    patient's own: every missing one blocks, whatever its policy, since the score would rest
    mostly on fills."""
    total = len(study.features) + len(study.demographics)
    if 2 * len(missing) <= total:
        return missing
    problems.append(
        f"{total - len(missing)} of the model's {total} inputs have a value; it scores no "
        "patient with more than half of them missing"
    )
    return [replace(m, blocking=True) for m in missing]


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    odds = math.exp(logit)  # no overflow for very negative logits
    return odds / (1.0 + odds)


def _map_all(resources: Iterable[Mapping[str, Any]]) -> tuple[list[MappedResource], list[str]]:
    mapped: list[MappedResource] = []
    problems: list[str] = []
    rejected: dict[str, int] = {}
    for resource in resources:
        try:
            mapped.append(map_resource(resource))
        except ResourceRejected as exc:  # the reason names elements, never values
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
    problems.extend(f"{count} resource(s) unusable: {why}" for why, count in rejected.items())
    return mapped, problems
