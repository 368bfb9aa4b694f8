"""FedAdam and FedYogi: adaptive server optimizers over the round's mean delta.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2. The mean delta Δ_t is
treated as a pseudo-gradient; the server keeps per-coordinate moments m and v across rounds, so
they are part of `get_state` and survive a hub restart. The maths is in
`aipipe.aggregation.maths` (`adam_step`, `yogi_step`, `initial_moments`), which documents why
v starts at τ² rather than at Flower's zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np

from aipipe.aggregation.base import (
    AggregationError,
    Aggregator,
    Array,
    Weights,
    refuse_non_finite,
)
from aipipe.aggregation.fedavg import positive_knob
from aipipe.aggregation.maths import adam_step, initial_moments, yogi_step

_Step = Callable[..., tuple[Weights, Weights, Weights]]


class _FedOpt(Aggregator):
    """Shared knobs and moment bookkeeping of the adaptive server optimizers."""

    _rule: ClassVar[_Step]

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__()
        self.server_lr = positive_knob("server_lr", server_lr)
        self.beta1 = _decay_knob("beta1", beta1)
        self.beta2 = _decay_knob("beta2", beta2)
        self.tau = positive_knob("tau", tau)
        self._m: Weights | None = None
        self._v: Weights | None = None

    def server_step(self, global_weights: Weights, mean_delta: Weights) -> Weights:
        if self._m is None or self._v is None:
            m, v = initial_moments(global_weights, self.tau)
        else:
            m, v = self._m, self._v
            _check_moments_fit(m, global_weights)
        rule = type(self)._rule
        new_global, new_m, new_v = rule(
            global_weights,
            mean_delta,
            m,
            v,
            lr=self.server_lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        refuse_non_finite(self.name, new_global)
        self._m, self._v = new_m, new_v
        return new_global

    def optimizer_state(self) -> dict[str, Array]:
        if self._m is None or self._v is None:
            return {}
        state = {f"m/{key}": arr.copy() for key, arr in self._m.items()}
        state.update({f"v/{key}": arr.copy() for key, arr in self._v.items()})
        return state

    def load_optimizer_state(self, state: Mapping[str, Array]) -> None:
        m = {key[2:]: np.asarray(arr, np.float64) for key, arr in state.items() if key[:2] == "m/"}
        v = {key[2:]: np.asarray(arr, np.float64) for key, arr in state.items() if key[:2] == "v/"}
        unknown = sorted(key for key in state if key[:2] not in ("m/", "v/"))
        if unknown:
            raise AggregationError(f"{self.name} state has unknown keys {unknown}")
        if not state:
            self._m = self._v = None
            return
        _check_moments_fit(m, v)
        if any(not np.all(np.isfinite(arr)) for arr in (*m.values(), *v.values())):
            raise AggregationError(f"{self.name} state holds NaN or infinity; it is corrupt")
        if any(np.any(arr < 0) for arr in v.values()):
            raise AggregationError(f"{self.name} state has a negative second moment; corrupt")
        self._m, self._v = m, v

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(server_lr={self.server_lr}, beta1={self.beta1}, "
            f"beta2={self.beta2}, tau={self.tau})"
        )


class FedAdam(_FedOpt):
    """Adam on the server: v_t = β2·v + (1-β2)·Δ² (Reddi et al. 2021, Algorithm 2)."""

    name: ClassVar[str] = "fedadam"
    _rule: ClassVar[_Step] = staticmethod(adam_step)


class FedYogi(_FedOpt):
    """Yogi on the server: v_t = v − (1-β2)·Δ²·sign(v − Δ²) (Reddi et al. 2021, Algorithm 2)."""

    name: ClassVar[str] = "fedyogi"
    _rule: ClassVar[_Step] = staticmethod(yogi_step)


def _decay_knob(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise AggregationError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_moments_fit(moments: Weights, model: Mapping[str, Array]) -> None:
    """Saved moments must have the model's names and shapes (the model did not change)."""
    shapes = {key: np.shape(arr) for key, arr in moments.items()}
    expected = {key: np.shape(arr) for key, arr in model.items()}
    if shapes != expected:
        changed = sorted(set(shapes.items()) ^ set(expected.items()))
        raise AggregationError(
            f"optimizer moments do not fit the model (differences: {changed[:4]}); "
            "the architecture changed, so start the server optimizer afresh"
        )
