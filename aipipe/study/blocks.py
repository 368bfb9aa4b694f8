"""The blocks a study file is made of, each a frozen pydantic model that refuses unknown keys.

`Cohort` (the label: any of a set of condition codes, optional onset window), `Feature`, and the
settings `StudySpec` (aipipe.study.spec) gathers: `Population`, `Validation`, `Split`,
`Preprocessing`, `ModelSpec`, `Training`, `Privacy`, `Aggregation`, `Bounds`, `SecureOptions`.
Codes are written `system|code` as in a FHIR token search; `loinc|`, `snomed|` and `icd10|` are
accepted as short system names, and an ICD-10 code may end in `*` to match its descendants. A
feature may instead name a `concept` from `aipipe.fhir.codes.CONCEPTS`, which brings the
equivalent codes and the canonical unit.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aipipe.fhir.codes import CONCEPTS, expand_token


class StudyBlock(BaseModel):
    """A study file's block (and the study itself): frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(StudyBlock):
    """Only conditions with onset in [start, end] count for the label."""

    start: date | None = None
    end: date | None = None


class Label(StudyBlock):
    conditions: list[str] = Field(min_length=1)
    window: Window | None = None

    @field_validator("conditions")
    @classmethod
    def _expand(cls, value: list[str]) -> list[str]:
        return [expand_token(token) for token in value]


class Cohort(StudyBlock):
    label: Label


class Feature(StudyBlock):
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


class Split(StudyBlock):
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


class Population(StudyBlock):
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


class Validation(StudyBlock):
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


class Preprocessing(StudyBlock):
    """`standardize: site` z-scores each column with the site's own train mean and std."""

    standardize: Literal["none", "site"] = "site"


class ModelSpec(StudyBlock):
    kind: Literal["logistic", "mlp"] = "logistic"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)


class Training(StudyBlock):
    rounds: int = Field(default=15, gt=0)
    local_steps: int = Field(default=100, gt=0)
    lr: float = Field(default=0.001, gt=0)
    batch_size: int = Field(default=4, gt=0)
    optimizer: Literal["sgd", "adam"] = "adam"
    proximal_mu: float = Field(default=0.0, ge=0)


class Privacy(StudyBlock):
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


ROBUST_KNOBS: dict[str, tuple[str, ...]] = {
    "trim": ("trimmed_mean",),
    "byzantine": ("krum",),
    "multi": ("krum",),
    "clip_radius": ("centered_clip",),
    "iterations": ("centered_clip",),
}
"""The robust aggregators' knobs and the aggregators that take each (aipipe.aggregation)."""


class Aggregation(StudyBlock):
    """The hub's server rule. The robust ones (trimmed_mean, median, krum, centered_clip) need
    every update on its own, so they run only with `secure: none`; their knobs, None unless
    set (the aggregator's default then): `trim` β per side (default 0.2), Krum's `byzantine` f
    (default 1) and `multi` m (default 1), centred clipping's `clip_radius` τ (default 1.0) and
    `iterations` L (default 1)."""

    name: Literal[
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "trimmed_mean",
        "median",
        "krum",
        "centered_clip",
    ] = "fedavg"
    # None takes the aggregator's own default: 1.0 for FedAvg/FedProx, 0.01 for FedAdam/Yogi.
    server_lr: float | None = Field(default=None, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    trim: float | None = Field(default=None, ge=0, lt=0.5)
    byzantine: int | None = Field(default=None, ge=0, le=10**6)
    multi: int | None = Field(default=None, ge=1, le=10**6)
    clip_radius: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    iterations: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> Aggregation:
        for knob, takers in ROBUST_KNOBS.items():
            if getattr(self, knob) is not None and self.name not in takers:
                raise ValueError(
                    f"aggregation `{knob}` applies to {' and '.join(takers)}, not to "
                    f"'{self.name}'; remove it or change `name`"
                )
        return self

    def unset_knobs(self) -> set[str]:
        """The robust knobs left unset, which a study's digest leaves out (older studies)."""
        return {knob for knob in ROBUST_KNOBS if getattr(self, knob) is None}


class Bounds(StudyBlock):
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


class SecureOptions(StudyBlock):
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
