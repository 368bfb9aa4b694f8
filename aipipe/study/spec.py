"""The study definition: a YAML file validated into `StudySpec`.

A study names its cohort (label = any of a set of condition codes, optional window), its
features, the train/test split, and the fields that training, privacy, secure aggregation and
aggregation use. Codes are written `system|code` as in a FHIR token search; `loinc|`, `snomed|`
and `icd10|` are accepted as short system names, and an ICD-10 code may end in `*` to match its
descendants. A feature may instead name a `concept` from `aipipe.fhir.codes.CONCEPTS`, which
brings the equivalent codes and the canonical unit.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aipipe.errors import StudyError
from aipipe.fhir.codes import CONCEPTS, SNOMED, expand_token
from aipipe.study.cds import CdsSettings

# A study names at most this many features and its matrix has at most this many columns (a
# categorical feature gives one per level): far above any clinical model, low enough that a
# hostile or mistaken study cannot stall the hub while it is validated and its model built.
MAX_FEATURES = 10_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Model):
    """Only conditions with onset in [start, end] count for the label."""

    start: date | None = None
    end: date | None = None


class Label(_Model):
    conditions: list[str] = Field(min_length=1)
    window: Window | None = None

    @field_validator("conditions")
    @classmethod
    def _expand(cls, value: list[str]) -> list[str]:
        return [expand_token(token) for token in value]


class Cohort(_Model):
    label: Label


class Feature(_Model):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    codes: list[str] = Field(default_factory=list)
    concept: str | None = None
    aggregation: Literal["latest", "mean", "min", "max", "count"] = "latest"
    unit: str | None = None
    missing: Literal["drop", "impute", "indicator"] = "drop"
    impute: float | None = None
    kind: Literal["numeric", "categorical"] = "numeric"
    levels: list[float] | None = None
    drop_first: bool = False
    # [lo, hi] in the feature's unit: values are clipped to it for the DP statistics the hub
    # pools for CDS (aipipe.privacy.statistics). A numeric feature without one releases none.
    range: tuple[float, float] | None = None
    # Only observations this many days before the scoring day count (overrides the study's
    # `population.lookback_days`).
    lookback_days: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Feature:
        if not self.codes and self.concept is None:
            raise ValueError(f"feature '{self.name}' needs `codes` or a `concept`")
        if self.concept is not None and self.concept not in CONCEPTS:
            known = ", ".join(sorted(CONCEPTS))
            raise ValueError(f"feature '{self.name}': unknown concept '{self.concept}' ({known})")
        if self.kind == "categorical" and not self.levels:
            raise ValueError(f"categorical feature '{self.name}' needs its `levels`")
        if self.kind == "categorical" and self.aggregation not in ("latest", "min", "max"):
            raise ValueError(f"categorical feature '{self.name}' needs latest, min or max")
        if self.range is not None and self.kind == "categorical":
            raise ValueError(
                f"categorical feature '{self.name}' takes no `range` (its columns are 0/1)"
            )
        if self.range is not None and not (
            math.isfinite(self.range[0]) and math.isfinite(self.range[1])
            and self.range[0] < self.range[1]
        ):  # fmt: skip
            raise ValueError(
                f"feature '{self.name}': `range` needs finite lo < hi, got {list(self.range)}"
            )
        return self

    @field_validator("codes")
    @classmethod
    def _expand(cls, value: list[str]) -> list[str]:
        return [expand_token(token) for token in value]

    def column_ranges(self) -> list[tuple[float, float]] | None:
        """The range of each of the feature's columns, or None if a value column has none."""
        if self.kind == "numeric" and self.range is None:
            return None
        value = self.range if self.kind == "numeric" else (0.0, 1.0)
        assert value is not None
        n = len(self.columns())
        return [
            (0.0, 1.0) if self.missing == "indicator" and i == n - 1 else value for i in range(n)
        ]

    def all_codes(self) -> list[str]:
        concept = CONCEPTS[self.concept].codes if self.concept else ()
        return sorted(set(self.codes) | set(concept))

    def target_unit(self) -> str | None:
        if self.unit is not None:
            return self.unit
        return CONCEPTS[self.concept].unit if self.concept else None

    def columns(self) -> list[str]:
        """The names of the matrix columns this feature produces, in order."""
        if self.kind == "categorical":
            assert self.levels is not None
            kept = self.levels[1:] if self.drop_first else self.levels
            cols = [f"{self.name}_{_level_name(level)}" for level in kept]
        else:
            cols = [self.name]
        if self.missing == "indicator":
            cols.append(f"{self.name}_missing")
        return cols


def _level_name(level: float) -> str:
    return str(int(level)) if float(level).is_integer() else str(level)


Demographic = Literal["age", "sex"]
# Demographic columns' ranges for the DP statistics: age in years, sex 0 (female) / 1 (male).
_DEMOGRAPHIC_RANGES: dict[str, tuple[float, float]] = {"age": (0.0, 120.0), "sex": (0.0, 1.0)}


class Split(_Model):
    """How each site divides its cohort into train and test.

    `keyed` (the default): a patient is in test when HMAC-SHA256, under a key the node derives
    from its secret pseudonym key, of the study name and the patient's pseudonym, read as a
    number in [0, 1), is below `test_fraction`. Each patient's side depends on that patient
    alone, so adding or deleting a patient moves no other one, and no one without the node's
    key can tell which side a patient is on. The test size is binomial, not exact; the split is
    not stratified.

    `seeded`: FLamby's benchmark split, sklearn's `train_test_split` over the cohort in id order
    with the public `seed`, stratified on the label when `stratify` (default true). It
    reproduces published per-site splits on public data, but deleting one patient re-draws many
    others: use it to reproduce a benchmark, not on patient data.
    """

    method: Literal["keyed", "seeded"] = "keyed"
    test_fraction: float = Field(default=0.34, gt=0, lt=1)
    seed: int | None = None
    stratify: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_files(cls, raw: Any) -> Any:
        """Study files (and stored studies) written before `method` existed set a `seed`: they
        asked for the seeded split, so they keep it."""
        if isinstance(raw, dict) and "method" not in raw and raw.get("seed") is not None:
            return {**raw, "method": "seeded"}
        return raw

    @model_validator(mode="after")
    def _check(self) -> Split:
        if self.method == "keyed" and (self.seed is not None or self.stratify is not None):
            raise ValueError(
                "seed and stratify apply only to `method: seeded` (FLamby's benchmark split); "
                "the default `method: keyed` assigns each patient by a keyed hash: remove them "
                "or set `method: seeded`"
            )
        if self.method == "seeded" and self.seed is None:
            raise ValueError("`method: seeded` needs a `seed` (FLamby's is 43)")
        return self


class Population(_Model):
    """Whom the model applies to: a patient outside gets no score, with the reason.

    `age` is [min, max] in years on the scoring day (at death for a deceased patient); `alive:
    true` scores no deceased patient; `lookback_days` keeps only observations dated within that
    many days before the scoring day (or `reference_date` in training), so a "latest" value from
    decades ago is not read as today's. A feature's own `lookback_days` overrides it.
    """

    age: tuple[float, float] | None = None
    alive: bool = False
    lookback_days: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Population:
        if self.age is not None and not (0 <= self.age[0] <= self.age[1]):
            raise ValueError(f"population `age` needs 0 <= min <= max, got {list(self.age)}")
        return self


class Validation(_Model):
    """What a model version must reach on held-out patients before it is served.

    A node serves (`serve-cds`, `predict`) a version only when its own evaluation on its
    test split meets these (exact numbers, never sent). With `epsilon > 0` each site also
    releases, per evaluated version, a DP-noised histogram of (label × predicted-probability
    bin) counts charged to its ledger at that ε; the hub sums them and its CDS serves the
    newest version whose pooled metrics meet these. With `epsilon: 0` the hub serves none.
    Metrics: `aipipe.study.validation`.
    """

    min_auc: float | None = Field(default=None, ge=0, le=1)
    max_calibration_error: float | None = Field(default=None, ge=0, le=1)
    # [lo, hi] for observed / expected events (calibration-in-the-large)
    observed_expected: tuple[float, float] | None = None
    min_patients: int = Field(default=50, ge=1)
    bins: int = Field(default=10, ge=2, le=50)
    epsilon: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Validation:
        oe = self.observed_expected
        if oe is not None and not 0 <= oe[0] <= oe[1]:
            raise ValueError(f"validation `observed_expected` needs 0 <= lo <= hi, got {list(oe)}")
        return self


class Preprocessing(_Model):
    """`standardize: site` z-scores each column with the site's own train mean and std."""

    standardize: Literal["none", "site"] = "site"


class ModelSpec(_Model):
    kind: Literal["logistic", "mlp"] = "logistic"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)


class Training(_Model):
    rounds: int = Field(default=15, gt=0)
    local_steps: int = Field(default=100, gt=0)
    lr: float = Field(default=0.001, gt=0)
    batch_size: int = Field(default=4, gt=0)
    optimizer: Literal["sgd", "adam"] = "adam"
    proximal_mu: float = Field(default=0.0, ge=0)


class Privacy(_Model):
    mode: Literal["dp", "none"] = "dp"
    epsilon: float = Field(default=1.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    clip: float = Field(default=1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "prv"
    # "disjoint": this study's patients share no one with the site's other studies, so the site
    # ledger may account it apart (parallel composition); the node checks it at every release.
    cohort: Literal["shared", "disjoint"] = "shared"
    # ε of the one release of noised preprocessing statistics (hub-side CDS), charged to the
    # study's share before training is planned; None: a tenth of `epsilon`; 0: none released.
    statistics_epsilon: float | None = Field(default=None, ge=0)

    def stats_epsilon(self) -> float:
        if self.mode != "dp":
            return 0.0
        return self.epsilon / 10 if self.statistics_epsilon is None else self.statistics_epsilon


class Aggregation(_Model):
    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    # None takes the aggregator's own default: 1.0 for FedAvg/FedProx, 0.01 for FedAdam/Yogi.
    server_lr: float | None = Field(default=None, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


class Bounds(_Model):
    """What one site may contribute to a round, in every `secure` mode; the hub refuses more.

    A node clips its model delta Δ to L2 norm `update_norm` (post-processing: DP is untouched)
    and counts at most `max_examples` rows: a larger site weighs as `max_examples`. Without
    these a single node could claim n = 10¹² or send Δ = target − base and set the model.

    Plaintext: the hub refuses an update whose signed n exceeds `max_examples` or whose Δ is
    longer than `update_norm`, and feature statistics that claim more rows. Secure modes: a
    node sends [r, r·Δ] with r = min(n, max_examples) / max_examples ∈ (0, 1], masked or
    encrypted, so the hub learns Σr and Σr·Δ (hence the FedAvg mean) but not any node's n or
    Δ; every coordinate lies in ±max(1, update_norm), the range the fixed-point codec and the
    CKKS parameters are sized for.
    """

    max_examples: int = Field(default=1000, gt=0, le=10**9)
    update_norm: float = Field(default=10.0, gt=0, le=1e6, allow_inf_nan=False)


class SecureOptions(_Model):
    """How `secure: secagg | ckks` protects each node's update (DESIGN §7); the update's
    bounds, which these modes encode with, are the study's `bounds`."""

    # SecAgg+: None takes the protocol defaults (aipipe.secure.secagg.graph): k = n − 1 up to
    # 10 nodes, t = ⌊2(k+1)/3⌋ + 1.
    neighbours: int | None = Field(default=None, gt=0)
    threshold: int | None = Field(default=None, gt=1)
    bits: Literal[32, 64] = 32
    # How long the hub waits at each key-exchange, masking or decryption stage for late nodes
    # before it counts them as dropped.
    stage_timeout_s: float = Field(default=120.0, gt=0)


class StudySpec(_Model):
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
    secure: Literal["none", "ckks", "secagg"] = "none"
    secure_options: SecureOptions = SecureOptions()
    bounds: Bounds = Bounds()
    aggregation: Aggregation = Aggregation()
    min_nodes: int = Field(default=2, ge=1)
    round_deadline_s: float = Field(default=600.0, gt=0)
    cds: CdsSettings | None = None

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
        if self.secure != "none" or self.privacy.stats_epsilon() <= 0:
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
        unset = [i for i, f in enumerate(self.features) if f.lookback_days is None]
        if unset:
            exclude["features"] = {i: {"lookback_days"} for i in unset}
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
