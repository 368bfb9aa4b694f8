"""FedAvg: the sample-weighted mean of node deltas, applied with a server learning rate.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
Algorithm 1: w_{t+1} = sum_k (n_k / n)·w^k_{t+1}. Written with deltas this is
w_{t+1} = w_t + η·sum_k (n_k / n)·Δ_k with η = 1; η ≠ 1 is FedAvg with server learning rate
(Reddi et al. 2021, the FedOpt family with SGD as the server optimizer).
"""

from __future__ import annotations

import math
from typing import ClassVar

from aipipe.aggregation.base import AggregationError, Aggregator, Weights
from aipipe.aggregation.maths import fedavg_step


class FedAvg(Aggregator):
    """Sample-weighted averaging of node updates (McMahan et al. 2017)."""

    name: ClassVar[str] = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = positive_knob("server_lr", server_lr)

    def server_step(self, global_weights: Weights, mean_delta: Weights) -> Weights:
        return fedavg_step(global_weights, mean_delta, self.server_lr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server_lr={self.server_lr})"


def positive_knob(name: str, value: float) -> float:
    """A finite, strictly positive setting (learning rates, τ), refused otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AggregationError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise AggregationError(f"{name} must be > 0, got {value}")
    return float(value)
