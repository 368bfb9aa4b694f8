"""Robust aggregators: trimmed mean, coordinate median, (multi-)Krum and centred clipping.

Each keeps every update of the round on its own (`requires_individual_updates`, which the secure
modes refuse at publish), computes one robust delta at `finalize` (the maths is in
`aipipe.aggregation.robust`) and applies it as FedAvg does: x_{t+1} = x_t + η·Δ_robust.

Unweighted: a node's `num_examples` is checked (a positive integer) and kept, but does not weigh
its update, because a malicious node controls the count it signs; these rules count each node
once, as the papers state them. An update holding NaN or infinity is refused by `accumulate`
before anything of it is kept. `get_state` carries the collected updates of an open round (and
`CenteredClip`'s centre), so `set_state` on a fresh aggregator resumes the round.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from aipipe.aggregation.base import (
    AggregationError,
    Aggregator,
    Array,
    Weights,
    _checked_count,
    _checked_like,
    _checked_model,
    _strip,
    refuse_non_finite,
)
from aipipe.aggregation.fedavg import positive_knob
from aipipe.aggregation.maths import fedavg_step
from aipipe.aggregation.robust import (
    centered_clip,
    check_krum_round,
    coordinate_median,
    flatten,
    krum_select,
    trimmed_mean,
    unflatten,
)

_ROUND_GLOBAL = "round/global/"
_ROUND_UPDATES = "round/updates"
_ROUND_COUNTS = "round/counts"
_CENTRE = "centre/"


class RobustAggregator(Aggregator):
    """Collects each update (flattened, float64) and steps by a robust delta of them all."""

    requires_individual_updates: ClassVar[bool] = True

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = positive_knob("server_lr", server_lr)
        self._rows: UpdateRows | None = None
        self._counts: list[int] = []

    @abstractmethod
    def robust_delta(self, updates: Array) -> Array:
        """The round's delta, as one vector, from the (n, d) matrix of its updates."""

    def begin(self, global_weights: Mapping[str, Array]) -> None:
        """Open a round against `global_weights`; updates collected before are dropped."""
        self._global = {key: arr.copy() for key, arr in _checked_model(global_weights).items()}
        self._sum, self._total = {}, 0
        self._rows, self._counts = UpdateRows(self._global), []

    def accumulate(self, delta: Mapping[str, Array], num_examples: int) -> None:
        """Keep one node's update; a mismatched or non-finite one is refused and nothing kept."""
        reference = self._open_round()
        n = _checked_count(num_examples, what="num_examples")
        checked = _checked_like(reference, delta, what="update")
        assert self._rows is not None  # begun with the round
        self._rows.append(checked)
        self._counts.append(n)
        self._total += n

    def finalize(self) -> Weights:
        """Close the round: x + η·Δ_robust. A refused step leaves the round open as it was."""
        reference = self._open_round()
        if self._rows is None or not self._counts:
            raise AggregationError(
                f"{self.name}: finalize() with no accepted update in this round; "
                "accumulate at least one"
            )
        robust = self.robust_delta(self._rows.matrix())
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, not warned
            new_global = self.server_step(reference, unflatten(robust, reference))
        refuse_non_finite(self.name, new_global)
        self.stepped(robust)
        self._close()
        return new_global

    def stepped(self, robust: Array) -> None:
        """Called with the round's robust delta once the step is usable (server state hook)."""

    def from_sum(
        self,
        global_weights: Mapping[str, Array],
        weighted_sum: Mapping[str, Array],
        total_examples: int,
    ) -> Weights:
        raise AggregationError(
            f"aggregation '{self.name}' needs every update on its own and cannot step from a "
            "sum; secure studies use fedavg, fedprox, fedadam or fedyogi"
        )

    def server_step(self, global_weights: Weights, mean_delta: Weights) -> Weights:
        return fedavg_step(global_weights, mean_delta, self.server_lr)

    # -- persistence ---------------------------------------------------------------------------

    def get_state(self) -> dict[str, Array]:
        state = dict(self.optimizer_state())
        if self._global is not None and self._rows is not None:
            for key, arr in self._global.items():
                state[_ROUND_GLOBAL + key] = arr.copy()
            state[_ROUND_UPDATES] = self._rows.matrix().copy()
            # float64: the tensor codec the hub stores state with carries floats only
            state[_ROUND_COUNTS] = np.array(self._counts, dtype=np.float64)
        return state

    def set_state(self, state: Mapping[str, Array]) -> None:
        round_state = {key: arr for key, arr in state.items() if key.startswith("round/")}
        self.load_optimizer_state({k: v for k, v in state.items() if k not in round_state})
        if round_state:
            self.begin_from(round_state)
        else:
            self._close()

    def begin_from(self, state: Mapping[str, Array]) -> None:
        """Reopen the round saved in `state` (global weights, updates, counts), checked."""
        global_weights = _strip(state, _ROUND_GLOBAL)
        known = {_ROUND_GLOBAL + k for k in global_weights} | {_ROUND_UPDATES, _ROUND_COUNTS}
        unknown = sorted(set(state) - known)
        if unknown or not global_weights or not {_ROUND_UPDATES, _ROUND_COUNTS} <= set(state):
            raise AggregationError(
                f"saved {self.name} round is incomplete or foreign (unexpected: "
                f"{unknown or 'none'}); fail the round and open a new one"
            )
        self.begin(global_weights)
        assert self._rows is not None
        updates = np.asarray(state[_ROUND_UPDATES], dtype=np.float64)
        counts = np.asarray(state[_ROUND_COUNTS]).reshape(-1)
        size = self._rows.width
        if updates.ndim != 2 or updates.shape != (len(counts), size):
            raise AggregationError(
                f"saved {self.name} round holds updates of shape {updates.shape} for "
                f"{len(counts)} counts and a model of {size} values; it is corrupt"
            )
        whole = np.all(np.isfinite(counts)) and np.all(counts >= 1) and np.all(counts % 1 == 0)
        if not np.all(np.isfinite(updates)) or not whole:
            raise AggregationError(f"saved {self.name} round holds a non-finite update or count")
        for row in updates:
            self._rows.append_flat(row)
        self._counts = [int(c) for c in counts]
        self._total = sum(self._counts)

    def _close(self) -> None:
        self._global, self._sum, self._total = None, {}, 0
        self._rows, self._counts = None, []


class UpdateRows:
    """A round's updates as the rows of one float64 matrix, flattened in sorted name order.

    Each update is converted straight into its row (one pass, no temporary), and the matrix the
    rules read is a view of the rows filled so far, so finalize copies nothing to stack them.
    """

    def __init__(self, like: Mapping[str, Array]) -> None:
        self._slices: dict[str, tuple[int, int]] = {}
        start = 0
        for key in sorted(like):
            self._slices[key] = (start, start + int(np.asarray(like[key]).size))
            start += int(np.asarray(like[key]).size)
        self.width = start
        self._data = np.empty((0, start), dtype=np.float64)
        self._count = 0

    def append(self, update: Mapping[str, Array]) -> None:
        row = self._next_row()
        for key, (start, stop) in self._slices.items():
            row[start:stop] = np.asarray(update[key]).reshape(-1)

    def append_flat(self, vector: Array) -> None:
        self._next_row()[:] = vector

    def matrix(self) -> Array:
        return self._data[: self._count]

    def _next_row(self) -> Array:
        if self._count == len(self._data):  # grow by doubling: O(1) amortised per update
            grown = np.empty((max(16, 2 * len(self._data)), self.width), dtype=np.float64)
            grown[: self._count] = self._data[: self._count]
            self._data = grown
        self._count += 1
        row: Array = self._data[self._count - 1]
        return row


class TrimmedMean(RobustAggregator):
    """Coordinate-wise β-trimmed mean: ⌊β·n⌋ values dropped per side (Yin et al. 2018)."""

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, server_lr: float = 1.0, trim: float = 0.2) -> None:
        super().__init__(server_lr=server_lr)
        if isinstance(trim, bool) or not isinstance(trim, int | float) or not 0 <= trim < 0.5:
            raise AggregationError(
                f"trim must be in [0, 0.5) (the share dropped per side), got {trim!r}"
            )
        self.trim = float(trim)

    def robust_delta(self, updates: Array) -> Array:
        return trimmed_mean(updates, math.floor(self.trim * updates.shape[0]))

    def __repr__(self) -> str:
        return f"TrimmedMean(server_lr={self.server_lr}, trim={self.trim})"


class CoordinateMedian(RobustAggregator):
    """Coordinate-wise median (Yin et al. 2018); an even count takes the two middle values' mean."""

    name: ClassVar[str] = "median"

    def robust_delta(self, updates: Array) -> Array:
        return coordinate_median(updates)

    def __repr__(self) -> str:
        return f"CoordinateMedian(server_lr={self.server_lr})"


class Krum(RobustAggregator):
    """Krum (m = 1) or multi-Krum (the mean of the m best-scored), Blanchard et al. 2017.

    f (`byzantine`) is how many nodes may be malicious; a round needs n ≥ 2f + 3 updates. Equal
    scores go to the update accumulated first (the hub accumulates in its stored order).
    """

    name: ClassVar[str] = "krum"

    def __init__(self, *, server_lr: float = 1.0, byzantine: int = 1, multi: int = 1) -> None:
        super().__init__(server_lr=server_lr)
        self.byzantine = count_knob("byzantine", byzantine, minimum=0)
        self.multi = count_knob("multi", multi, minimum=1)

    def check_round_size(self, n: int) -> None:
        check_krum_round(n, self.byzantine, self.multi)

    def robust_delta(self, updates: Array) -> Array:
        chosen = krum_select(updates, self.byzantine, self.multi)
        mean: Array = updates[chosen].mean(axis=0)
        return mean

    def __repr__(self) -> str:
        return f"Krum(server_lr={self.server_lr}, byzantine={self.byzantine}, multi={self.multi})"


class CenteredClip(RobustAggregator):
    """Norm-bounded FedAvg: each update clipped to radius τ around a centre (Karimireddy et al.
    2021), iterated L times from the previous round's robust delta (zero in the first round).

    The centre is server state (`optimizer_state`, ``centre/<name>``), kept with the study's head
    so a restarted hub continues from it. One update, however large, moves the result by at most
    2·L·τ/n (see `aipipe.aggregation.robust.centered_clip`).
    """

    name: ClassVar[str] = "centered_clip"

    def __init__(
        self, *, server_lr: float = 1.0, clip_radius: float = 1.0, iterations: int = 1
    ) -> None:
        super().__init__(server_lr=server_lr)
        self.clip_radius = positive_knob("clip_radius", clip_radius)
        self.iterations = count_knob("iterations", iterations, minimum=1, maximum=100)
        self._centre: Weights | None = None

    def robust_delta(self, updates: Array) -> Array:
        reference = self._open_round()
        if self._centre is None:
            centre = np.zeros(updates.shape[1], dtype=np.float64)
        else:
            _check_centre_fits(self._centre, reference)
            centre = flatten(self._centre, reference)
        return centered_clip(updates, centre, self.clip_radius, self.iterations)

    def stepped(self, robust: Array) -> None:
        self._centre = unflatten(robust.copy(), self._open_round())

    def optimizer_state(self) -> dict[str, Array]:
        if self._centre is None:
            return {}
        return {_CENTRE + key: arr.copy() for key, arr in self._centre.items()}

    def load_optimizer_state(self, state: Mapping[str, Array]) -> None:
        unknown = sorted(key for key in state if not key.startswith(_CENTRE))
        if unknown:
            raise AggregationError(f"{self.name} state has unknown keys {unknown}")
        centre = {k: np.asarray(a, dtype=np.float64) for k, a in _strip(state, _CENTRE).items()}
        if any(not np.all(np.isfinite(arr)) for arr in centre.values()):
            raise AggregationError(f"{self.name} centre holds NaN or infinity; it is corrupt")
        self._centre = centre or None

    def __repr__(self) -> str:
        return (
            f"CenteredClip(server_lr={self.server_lr}, clip_radius={self.clip_radius}, "
            f"iterations={self.iterations})"
        )


def count_knob(name: str, value: int, *, minimum: int, maximum: int | None = None) -> int:
    """An integer setting in [minimum, maximum], refused otherwise (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise AggregationError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and ≤ {maximum}"
        raise AggregationError(f"{name} must be ≥ {minimum}{upper}, got {value}")
    return int(value)


def _check_centre_fits(centre: Weights, model: Mapping[str, Array]) -> None:
    shapes = {key: np.shape(arr) for key, arr in centre.items()}
    expected = {key: np.shape(arr) for key, arr in model.items()}
    if shapes != expected:
        changed = sorted(set(shapes.items()) ^ set(expected.items()))
        raise AggregationError(
            f"the centred-clipping centre does not fit the model (differences: {changed[:4]}); "
            "the architecture changed, so restart the study's aggregation afresh"
        )
