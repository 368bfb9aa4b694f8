"""The `Attack` ABC of the malicious-node harness: what a poisoning node changes in its data
before training (data-level) or in its update after training (update-level), and the one call
(`Attack.run`) that a node's worker makes in place of its honest train-then-clip.

A test and benchmark facility (issue 14): no study can ask for it. A node runs one only when
started with the hidden `aipipe node start --attack NAME[:PARAM]`, which warns loudly and writes
`attack.enabled` to the node's own audit log. The node still follows the protocol: it signs,
frames and sends what `run` returns like any update, so everything the hub checks (signature,
binding, `bounds.update_norm`, `bounds.max_examples`) still applies to it.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from aipipe.models.training import TrainResult, clip_update

Array = npt.NDArray[Any]
Arrays = dict[str, Array]
Train = Callable[[Array, Array], TrainResult]
"""Honest local training on (X, y): what the worker would run without an attack."""


class Attack(ABC):
    """One poisoning behaviour. Subclasses override `poison` (data-level) or `corrupt`
    (update-level); the defaults leave data and update as they are.

    `skips_clip`: the node does not project its update on the `bounds.update_norm` ball before
    signing; the plaintext hub then refuses the update (`check_bounds`), which is what such an
    attack measures. Under secure aggregation `contribution()` clips it anyway.
    """

    name: ClassVar[str]
    level: ClassVar[str]  # "update" or "data"
    skips_clip: ClassVar[bool] = False

    def poison(self, x: Array, y: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """The training rows a data-level attacker trains on instead of (x, y)."""
        return x, y

    def corrupt(self, own: Arrays, benign: Sequence[Arrays], rng: np.random.Generator) -> Arrays:
        """The update an update-level attacker sends instead of its honest `own`.

        `benign` holds the honest updates of the colluding attackers, `own` among them; a lone
        node passes `[own]`. Attacks that need statistics over updates (ALIE, IPM) use them.
        """
        return own

    def describe(self) -> dict[str, Any]:
        """Name and settings, for the audit log and benchmark records."""
        return {"attack": self.name, "level": self.level, **self.settings()}

    def settings(self) -> dict[str, Any]:
        return {}

    def run(
        self, train: Train, x: Array, y: Array, update_norm: float, rng: np.random.Generator
    ) -> TrainResult:
        """Poison the rows, train honestly on them, corrupt the update, then clip it to
        `update_norm` as an honest node does (unless `skips_clip`)."""
        px, py = self.poison(x, y, rng)
        result = train(px, py)
        corrupted = self.corrupt(result.delta, [result.delta], rng)
        result = with_delta(result, corrupted)
        return result if self.skips_clip else clip_update(result, update_norm)


def with_delta(result: TrainResult, delta: Arrays) -> TrainResult:
    """`result` carrying `delta` instead, with its weights (start + Δ) and norm to match."""
    if delta is result.delta:
        return result
    start = {k: result.weights[k] - result.delta[k] for k in result.weights}
    cast = {k: np.asarray(delta[k], dtype=result.delta[k].dtype) for k in result.delta}
    weights = {k: (start[k] + cast[k]).astype(result.weights[k].dtype) for k in start}
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in cast.values()))
    return replace(result, weights=weights, delta=cast, update_norm=norm)


def flat_norm(update: Arrays) -> float:
    """The L2 norm of an update over all its arrays."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))
