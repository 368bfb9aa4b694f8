"""The study definition: a YAML file validated into `StudySpec`.

A study names its cohort (label = any of a set of condition codes, optional window), its
features, the train/test split, and the fields that training, privacy, secure aggregation and
aggregation use; each of those blocks is a model in `aipipe.study.blocks`. `StudySpec` checks
what spans blocks (unique names and columns, a reference date for ages), derives the matrix
columns and the DP statistics' ranges, and gives the digest a node approves; `parse_study` and
`load_study` read it from YAML with errors that say where the file is wrong.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from aipipe.errors import StudyError
from aipipe.fhir.codes import CONCEPTS, SNOMED
from aipipe.study.blocks import (
    Aggregation,
    Bounds,
    Cohort,
    Demographic,
    Feature,
    ModelSpec,
    Population,
    Preprocessing,
    Privacy,
    SecureOptions,
    Split,
    StudyBlock,
    Training,
    Validation,
)
from aipipe.study.cds import CdsSettings
from aipipe.study.detection import Detection
from aipipe.study.personal import Personalization
from aipipe.wire import SecureMode

# A study names at most this many features and its matrix has at most this many columns (a
# categorical feature gives one per level): far above any clinical model, low enough that a
# hostile or mistaken study cannot stall the hub while it is validated and its model built.
MAX_FEATURES = 10_000


# Demographic columns' ranges for the DP statistics: age in years, sex 0 (female) / 1 (male).
_DEMOGRAPHIC_RANGES: dict[str, tuple[float, float]] = {"age": (0.0, 120.0), "sex": (0.0, 1.0)}


class StudySpec(StudyBlock):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    description: str = ""
    cohort: Cohort
    features: list[Feature] = Field(min_length=1, max_length=MAX_FEATURES)
    demographics: list[Demographic] = Field(default_factory=list)
    reference_date: date | None = None
    population: Population | None = None
    validation: Validation | None = None
    split: Split = Split()
    preprocessing: Preprocessing = Preprocessing()
    model: ModelSpec = ModelSpec()
    training: Training = Training()
    privacy: Privacy = Privacy()
    secure: SecureMode = SecureMode.NONE
    secure_options: SecureOptions = SecureOptions()
    bounds: Bounds = Bounds()
    aggregation: Aggregation = Aggregation()
    min_nodes: int = Field(default=2, ge=1)
    round_deadline_s: float = Field(default=600.0, gt=0)
    cds: CdsSettings | None = None
    personalization: Personalization | None = None
    detection: Detection | None = None

    @model_validator(mode="before")
    @classmethod
    def _early_limits(cls, raw: Any) -> Any:
        """Refuse an oversized feature list before each feature is validated, and read the
        bounds that older study files set under `secure_options`."""
        if not isinstance(raw, dict):
            return raw
        features = raw.get("features")
        if isinstance(features, list) and len(features) > MAX_FEATURES:
            raise ValueError(
                f"the study lists {len(features)} features; at most {MAX_FEATURES} are "
                "allowed: select fewer features"
            )
        return _moved_bounds(raw)

    @model_validator(mode="after")
    def _unique_names(self) -> StudySpec:
        # Counters, not list.count: linear in the number of features (DESIGN: a study of tens
        # of thousands of features must not stall the hub that validates it).
        names = Counter([f.name for f in self.features] + list(self.demographics))
        dupes = sorted(n for n, k in names.items() if k > 1)
        if dupes:
            raise ValueError(f"feature names must be unique; repeated: {_few(dupes)}")
        columns = self.columns()
        if len(columns) > MAX_FEATURES:
            raise ValueError(
                f"the features produce {len(columns)} columns; at most {MAX_FEATURES} are "
                "allowed: select fewer features or levels"
            )
        clashes = sorted(c for c, k in Counter(columns).items() if k > 1)
        if clashes:
            raise ValueError(f"two features produce the same column: {_few(clashes)}")
        if "age" in self.demographics and self.reference_date is None:
            raise ValueError("demographics 'age' needs a reference_date (age on that day)")
        if self.population is not None and self.population.age and self.reference_date is None:
            raise ValueError("population `age` needs a reference_date (age on that day)")
        if self.detection is not None and self.secure != SecureMode.NONE:
            raise ValueError(
                f"`detection` screens each update on its own, which secure: {self.secure} "
                "hides from the hub; drop the `detection` block (the bounds' update_norm still "
                "limits each node) or publish with secure: none"
            )
        return self

    @model_validator(mode="after")
    def _personal_split(self) -> StudySpec:
        # fedper federates the body, fenda a feature extractor: a logistic model has neither
        # (an identity body), so nothing would be federated.
        method = self.personalization.method if self.personalization is not None else "none"
        if method in ("fedper", "fenda") and (self.model.kind != "mlp" or not self.model.hidden):
            raise ValueError(
                f"personalization method '{method}' federates the model's hidden layers, and "
                f"model kind '{self.model.kind}' has none, so nothing would be federated; use "
                "model kind: mlp with hidden layers (e.g. hidden: [32])"
            )
        return self

    def cds_settings(self) -> CdsSettings:
        """The study's `cds:` block, or the defaults when it has none."""
        return self.cds or CdsSettings()

    def outcome_display(self) -> str:
        """The outcome as a clinician reads it: the `cds:` block's `outcome_label`, else the
        display of the concept its first exact SNOMED code belongs to, else the study's name."""
        if self.cds is not None and self.cds.outcome_label is not None:
            return self.cds.outcome_label
        for token in self.cohort.label.conditions:
            if token.startswith(SNOMED + "|") and not token.endswith("*"):
                for concept in CONCEPTS.values():
                    if token in concept.codes:
                        return concept.display
        return self.name

    def lookback_days(self, feature: Feature) -> int | None:
        """The feature's look-back window in days (its own, else the population's), or None."""
        if feature.lookback_days is not None:
            return feature.lookback_days
        return self.population.lookback_days if self.population is not None else None

    def columns(self) -> list[str]:
        cols = [col for feature in self.features for col in feature.columns()]
        return cols + list(self.demographics)

    def statistics_ranges(self) -> list[tuple[float, float]] | None:
        """Each column's range for the DP statistics, or None when this study releases none
        (secure aggregation, no DP, ε for statistics 0, or a numeric feature without a range)."""
        if self.secure != SecureMode.NONE or self.privacy.stats_epsilon() <= 0:
            return None
        ranges: list[tuple[float, float]] = []
        for feature in self.features:
            own = feature.column_ranges()
            if own is None:
                return None
            ranges.extend(own)
        return ranges + [_DEMOGRAPHIC_RANGES[name] for name in self.demographics]

    def imputed_columns(self) -> list[tuple[int, float | None]]:
        """(column, the study's fill value or None for the train mean) of every value column
        that an `impute` or `indicator` feature fills (as the node's extraction does)."""
        out: list[tuple[int, float | None]] = []
        col = 0
        for feature in self.features:
            n = len(feature.columns())
            values = n - 1 if feature.missing == "indicator" else n
            if feature.missing != "drop":
                out.extend((c, feature.impute) for c in range(col, col + values))
            col += n
        return out

    def digest(self) -> str:
        """sha256 over the canonical JSON form: what a node approves and pins."""
        # Fields added later are left out while unset, so older studies keep their digest.
        exclude: dict[str, Any] = {}
        if self.population is None:
            exclude["population"] = True
        if self.cds is None:
            exclude["cds"] = True
        if self.validation is None:
            exclude["validation"] = True
        if self.personalization is None:
            exclude["personalization"] = True
        if self.detection is None:
            exclude["detection"] = True
        unset = [i for i, f in enumerate(self.features) if f.lookback_days is None]
        if unset:
            exclude["features"] = {i: {"lookback_days"} for i in unset}
        if knobs := self.aggregation.unset_knobs():
            exclude["aggregation"] = knobs
        canonical = self.model_dump_json(exclude_none=False, exclude=exclude).encode()
        return hashlib.sha256(canonical).hexdigest()


def _few(names: list[str], limit: int = 10) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" (and {more} more)" if more > 0 else "")


_MOVED_BOUNDS = {"update_clip": "update_norm", "max_examples": "max_examples"}


def _moved_bounds(raw: dict[str, Any]) -> dict[str, Any]:
    """Study files written before `bounds` set them as `secure_options.update_clip` and
    `secure_options.max_examples`; read those as `bounds` (a study may not set both)."""
    options = raw.get("secure_options")
    if not isinstance(options, dict) or not set(options) & set(_MOVED_BOUNDS):
        return raw
    bounds = raw.get("bounds", {})
    if not isinstance(bounds, dict):
        return raw
    moved = {_MOVED_BOUNDS[k]: v for k, v in options.items() if k in _MOVED_BOUNDS}
    if set(moved) & set(bounds):
        raise ValueError("set max_examples and update_norm under `bounds` only")
    rest = {k: v for k, v in options.items() if k not in _MOVED_BOUNDS}
    return {**raw, "secure_options": rest, "bounds": {**bounds, **moved}}


def parse_study(text: str, *, source: str = "<study>") -> StudySpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StudyError(f"{source} is not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(raw, dict):
        raise StudyError(f"{source} must be a YAML mapping with name, cohort and features")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(f"{source} is not a valid study: {_first_errors(exc)}") from exc


def load_study(path: Path) -> StudySpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyError(f"cannot read study file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise StudyError(
            f"study file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from exc
    return parse_study(text, source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what the parser found and where, without its multi-line excerpt of the file."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "study"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
