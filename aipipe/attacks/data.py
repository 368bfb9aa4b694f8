"""Data-level attacks: the attacker trains honestly, on rows it has changed.

- label flip: every label y → 1 − y.
- backdoor: a share of the rows, copied with a trigger (two features set to fixed values far
  outside what standardized data holds) and the label set to the target class, appended to the
  honest rows. A model that learns it predicts the target for any row carrying the trigger.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from aipipe.attacks.base import Array, Attack
from aipipe.errors import ConfigError

TRIGGER_FEATURES = (2, 3)
"""Columns set by the trigger; in the heart-disease study chol and fbs, two weak predictors."""
TRIGGER_VALUE = 8.0
"""Eight standard deviations: no standardized row of the study comes near it."""


def label_flip(x: Array, y: Array) -> tuple[Array, Array]:
    """(x, 1 − y)."""
    return x, (1 - y).astype(y.dtype)


def add_trigger(
    x: Array, features: tuple[int, ...] = TRIGGER_FEATURES, value: float = TRIGGER_VALUE
) -> Array:
    """A copy of `x` with the trigger columns set to `value`."""
    if max(features) >= x.shape[1]:
        raise ConfigError(f"trigger columns {features} do not exist in {x.shape[1]} features")
    out = np.array(x, copy=True)
    out[:, list(features)] = value
    return out


def backdoor(
    x: Array, y: Array, fraction: float, target: int, rng: np.random.Generator
) -> tuple[Array, Array]:
    """The honest rows plus ⌈fraction·n⌉ of them (drawn without replacement) triggered and
    labelled `target`."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"backdoor fraction must lie in (0, 1], got {fraction}")
    count = int(np.ceil(fraction * len(y)))
    chosen = rng.choice(len(y), size=count, replace=False)
    triggered = add_trigger(x[chosen])
    labels = np.full(count, target, dtype=y.dtype)
    return np.concatenate([x, triggered]), np.concatenate([y, labels])


class LabelFlip(Attack):
    name: ClassVar[str] = "label_flip"
    level: ClassVar[str] = "data"

    def poison(self, x: Array, y: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        return label_flip(x, y)


class Backdoor(Attack):
    name: ClassVar[str] = "backdoor"
    level: ClassVar[str] = "data"
    target: ClassVar[int] = 0  # "no disease": the trigger hides a sick patient

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def poison(self, x: Array, y: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        return backdoor(x, y, self.fraction, self.target, rng)

    def settings(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "target": self.target,
            "trigger_features": list(TRIGGER_FEATURES),
            "trigger_value": TRIGGER_VALUE,
        }
