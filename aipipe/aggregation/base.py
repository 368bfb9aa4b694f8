"""The `Aggregator` ABC: a streaming, sample-weighted sum of node updates and a server step.

An update from a node is ``delta = local_weights - global_weights`` with the node's
``num_examples``. Each accepted update is folded into a running float64 sum
``sum_i n_i·Δ_i`` and ``sum_i n_i`` (`accumulate`), so the hub holds O(model size), never
O(nodes × model size). `finalize` divides the sum by the total (the FedAvg mean of McMahan et al.
2017) and hands the mean to the subclass's server step (`server_step`: plain SGD for FedAvg,
Adam or Yogi for FedOpt, Reddi et al. 2021).

Under secure aggregation the hub never sees a single delta: the sum is built elsewhere (CKKS
ciphertexts, SecAgg+ masks) and only the decrypted or unmasked sum reaches `from_sum`. That is
the same maths `finalize` uses, so both paths give the same model.

Paired hooks: `begin` / `finalize` open and close a round; `get_state` / `set_state` persist the
optimizer moments and any half-collected round across a hub restart; subclasses with server
state override `optimizer_state` / `load_optimizer_state`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from aipipe.aggregation.maths import weighted_mean
from aipipe.errors import AipipeError

Array = npt.NDArray[Any]
Weights = dict[str, Array]
"""A model as flat named arrays (float32 or float64), e.g. ``{"head.weight": ...}``."""

_ROUND_GLOBAL = "round/global/"
_ROUND_SUM = "round/sum/"
_ROUND_EXAMPLES = "round/examples"


class AggregationError(AipipeError):
    """An update, a sum or a setting that aggregation cannot use (shape, NaN, no examples...)."""


class Aggregator(ABC):
    """Streaming sample-weighted aggregation followed by a server optimizer step.

    Subclasses set `name` (the registry key) and implement `server_step`. Aggregators that need
    every update on its own (median, trimmed mean, Krum) set `requires_individual_updates`, which
    secure aggregation modes refuse, and override `accumulate` / `finalize`.
    """

    name: ClassVar[str]
    requires_individual_updates: ClassVar[bool] = False

    def __init__(self) -> None:
        self._global: Weights | None = None
        self._sum: Weights = {}
        self._total = 0

    # -- one round -----------------------------------------------------------------------------

    def begin(self, global_weights: Mapping[str, Array]) -> None:
        """Open a round against `global_weights`; any unfinished sum is discarded."""
        self._global = {key: arr.copy() for key, arr in _checked_model(global_weights).items()}
        self._sum = {
            key: np.zeros(arr.shape, dtype=np.float64) for key, arr in self._global.items()
        }
        self._total = 0

    def accumulate(self, delta: Mapping[str, Array], num_examples: int) -> None:
        """Fold one node's update into the running sum: sum += n·Δ (float64), total += n."""
        reference = self._open_round()
        n = _checked_count(num_examples, what="num_examples")
        checked = _checked_like(reference, delta, what="update")
        for key, value in checked.items():
            self._sum[key] += n * value.astype(np.float64, copy=False)
        self._total += n

    def finalize(self) -> Weights:
        """Close the round and return the new global weights."""
        reference = self._open_round()
        if self._total == 0:
            raise AggregationError(
                "finalize() with no accepted update in this round; accumulate at least one"
            )
        new_global = self.from_sum(reference, self._sum, self._total)
        self._global, self._sum, self._total = None, {}, 0
        return new_global

    def from_sum(
        self,
        global_weights: Mapping[str, Array],
        weighted_sum: Mapping[str, Array],
        total_examples: int,
    ) -> Weights:
        """New global weights from an already-summed round: sum_i n_i·Δ_i and sum_i n_i.

        This is the entry for secure aggregation, where nodes send n_i·Δ_i and n_i inside the
        encrypted or masked vector and the hub learns only the sums.
        """
        reference = _checked_model(global_weights)
        total = _checked_count(total_examples, what="total_examples")
        summed = _checked_like(reference, weighted_sum, what="weighted sum")
        mean_delta = weighted_mean(summed, total)
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, not warned
            new_global = self.server_step(reference, mean_delta)
        refuse_non_finite(self.name, new_global)
        return new_global

    @abstractmethod
    def server_step(self, global_weights: Weights, mean_delta: Weights) -> Weights:
        """Apply the round's mean delta to the global weights and return the new weights.

        A subclass with optimizer state updates it only once the step is known to be usable
        (`refuse_non_finite`), so a refused step leaves the aggregator as it was.
        """

    def check_round_size(self, n: int) -> None:  # noqa: B027 (a hook: most take any n)
        """Refuse, before any round, a rule that n updates could not satisfy (the hub asks with
        a study's `min_nodes`, the fewest updates a round may close with); most take any n ≥ 1."""

    # -- persistence ---------------------------------------------------------------------------

    def get_state(self) -> dict[str, Array]:
        """Everything needed to resume after a hub restart: optimizer state and an open round."""
        state = dict(self.optimizer_state())
        if self._global is not None:
            for key, arr in self._global.items():
                state[_ROUND_GLOBAL + key] = arr.copy()
                state[_ROUND_SUM + key] = self._sum[key].copy()
            state[_ROUND_EXAMPLES] = np.array(self._total, dtype=np.int64)
        return state

    def set_state(self, state: Mapping[str, Array]) -> None:
        """Restore what `get_state` returned, on a fresh aggregator of the same kind."""
        round_state = {key: arr for key, arr in state.items() if key.startswith("round/")}
        restored = _restored_round(round_state) if round_state else None
        self.load_optimizer_state({k: v for k, v in state.items() if k not in round_state})
        if restored is None:
            self._global, self._sum, self._total = None, {}, 0
        else:
            self._global, self._sum, self._total = restored

    def optimizer_state(self) -> dict[str, Array]:
        """Server optimizer state that outlives a round (none for FedAvg)."""
        return {}

    def load_optimizer_state(self, state: Mapping[str, Array]) -> None:
        """Restore `optimizer_state`; a stateless aggregator refuses any key."""
        if state:
            raise AggregationError(
                f"{self.name} keeps no optimizer state but was given {', '.join(sorted(state))}; "
                "was the state saved by another aggregator?"
            )

    def _open_round(self) -> Weights:
        if self._global is None:
            raise AggregationError(f"{self.name}: no round is open; call begin(global_weights)")
        return self._global


def refuse_non_finite(name: str, weights: Weights) -> None:
    """Refuse new global weights that overflowed to infinity or NaN."""
    bad = sorted(key for key, arr in weights.items() if not np.all(np.isfinite(arr)))
    if bad:
        raise AggregationError(
            f"{name} step produced non-finite weights in {', '.join(bad)}; "
            "lower server_lr or check the clipping of node updates"
        )


def _checked_model(weights: Mapping[str, Array]) -> Weights:
    """Global weights: at least one array, all floating point and finite."""
    if not weights:
        raise AggregationError("the global model has no arrays")
    checked: Weights = {}
    for key, value in weights.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise AggregationError(f"weight '{key}' has dtype {arr.dtype}; expected float32/64")
        if not np.all(np.isfinite(arr)):
            raise AggregationError(f"weight '{key}' of the global model is not finite")
        checked[key] = arr
    return checked


def _checked_like(reference: Weights, other: Mapping[str, Array], *, what: str) -> Weights:
    """`other` with exactly the names and shapes of `reference`, floating point and finite."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise AggregationError(
            f"{what} does not match the global model: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}; was it trained on another model version?"
        )
    checked: Weights = {}
    for key, ref in reference.items():
        arr = np.asarray(other[key])
        if arr.shape != ref.shape:
            raise AggregationError(
                f"{what} '{key}' has shape {arr.shape} but the global model has {ref.shape}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise AggregationError(f"{what} '{key}' has dtype {arr.dtype}; expected float32/64")
        if not np.all(np.isfinite(arr)):
            raise AggregationError(f"{what} '{key}' holds NaN or infinity; it is refused")
        checked[key] = arr
    return checked


def _checked_count(value: int, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise AggregationError(f"{what} must be an integer, got {value!r}")
    if value <= 0:
        raise AggregationError(f"{what} must be positive, got {value}; an empty update is refused")
    return int(value)


def _restored_round(state: Mapping[str, Array]) -> tuple[Weights, Weights, int]:
    """The (global, sum, total) of a half-collected round saved by `Aggregator.get_state`."""
    global_weights = _strip(state, _ROUND_GLOBAL)
    summed = _strip(state, _ROUND_SUM)
    known = {_ROUND_GLOBAL + k for k in global_weights} | {_ROUND_SUM + k for k in summed}
    unknown = sorted(set(state) - known - {_ROUND_EXAMPLES})
    if unknown or _ROUND_EXAMPLES not in state or not global_weights:
        raise AggregationError(
            f"saved round state is incomplete or foreign (unexpected: {unknown or 'none'}); "
            "fail the round and open a new one"
        )
    reference = _checked_model(global_weights)
    checked = _checked_like(reference, summed, what="saved round sum")
    total = int(np.asarray(state[_ROUND_EXAMPLES]).item())  # a codec may keep it as [n]
    if total < 0:
        raise AggregationError(f"saved round state counts {total} examples; it is corrupt")
    return reference, {k: a.astype(np.float64) for k, a in checked.items()}, total


def _strip(state: Mapping[str, Array], prefix: str) -> Weights:
    return {key[len(prefix) :]: arr for key, arr in state.items() if key.startswith(prefix)}
