"""The maths of server-side aggregation, as pure functions over named arrays.

Nothing here keeps state or validates input; `aipipe.aggregation.base.Aggregator` checks names,
shapes and finiteness before it calls these. All arithmetic is float64; new global weights are
cast back to the dtype of the weights they replace, optimizer moments stay float64.

Server optimizers follow Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2,
with the round's mean delta Δ_t as the pseudo-gradient:

    m_t     = β1·m_{t-1} + (1-β1)·Δ_t
    v_t     = β2·v_{t-1} + (1-β2)·Δ_t²                       (FedAdam)
    v_t     = v_{t-1} - (1-β2)·Δ_t²·sign(v_{t-1} - Δ_t²)     (FedYogi)
    x_{t+1} = x_t + η·m_t / (√v_t + τ)

without Adam's bias correction (the paper has none). Initial moments: m_{-1} = 0 and
v_{-1} = τ², the smallest value Algorithm 2 allows ("v_{-1} ≥ τ²"). Flower's FedAdam and FedYogi
(`flwr/server/strategy/fedadam.py`, `fedyogi.py`) start both m and v at zeros, and Flower's current
FedAdam also scales η by Adam's bias correction √(1-β2^(t+1))/(1-β1^(t+1)); neither is in the
paper, so neither is copied here (see `initial_moments`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aipipe.aggregation.base import Array, Weights


def weighted_mean(weighted_sum: Weights, total_examples: int) -> Weights:
    """sum_i n_i·Δ_i / sum_i n_i: the sample-weighted mean delta of McMahan et al. 2017, eq. (1).

    `total_examples` must be positive; the caller checks it.
    """
    return {
        key: np.asarray(arr, dtype=np.float64) / total_examples for key, arr in weighted_sum.items()
    }


def fedavg_step(global_weights: Weights, mean_delta: Weights, server_lr: float) -> Weights:
    """x_{t+1} = x_t + η·Δ_t; with η = 1 this is exactly FedAvg's weighted average of models."""
    return {
        key: _cast_like(x, _f64(x) + server_lr * _f64(mean_delta[key]))
        for key, x in global_weights.items()
    }


def initial_moments(like: Weights, tau: float) -> tuple[Weights, Weights]:
    """m_{-1} = 0 and v_{-1} = τ² (Reddi et al. 2021, Algorithm 2, line 1: v_{-1} ≥ τ²).

    Flower starts v at zeros. The first step then differs from Flower's only where |Δ_0| is not
    much larger than τ: FedAdam's v_0 gains β2·τ², and FedYogi's v_0 is τ² + (1-β2)·Δ_0² where
    |Δ_0| > τ (Yogi's sign term keeps v ≥ 0 either way, so √v is always defined).
    """
    m = {key: np.zeros(arr.shape, dtype=np.float64) for key, arr in like.items()}
    v = {key: np.full(arr.shape, tau * tau, dtype=np.float64) for key, arr in like.items()}
    return m, v


def adam_step(
    global_weights: Weights,
    mean_delta: Weights,
    m: Weights,
    v: Weights,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Weights, Weights, Weights]:
    """One FedAdam server step; returns (new global weights, m_t, v_t). Inputs are not changed."""
    new_m = _first_moment(m, mean_delta, beta1)
    new_v = {
        key: beta2 * _f64(v[key]) + (1.0 - beta2) * np.square(_f64(delta))
        for key, delta in mean_delta.items()
    }
    return _adaptive_update(global_weights, new_m, new_v, lr, tau), new_m, new_v


def yogi_step(
    global_weights: Weights,
    mean_delta: Weights,
    m: Weights,
    v: Weights,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Weights, Weights, Weights]:
    """One FedYogi server step; returns (new global weights, m_t, v_t). Inputs are not changed.

    Yogi (Zaheer et al. 2018) moves v towards Δ² additively, by at most (1-β2)·Δ², so v cannot
    collapse after one large round the way Adam's exponential average does.
    """
    new_m = _first_moment(m, mean_delta, beta1)
    new_v = {}
    for key, delta in mean_delta.items():
        squared = np.square(_f64(delta))
        previous = _f64(v[key])
        new_v[key] = previous - (1.0 - beta2) * squared * np.sign(previous - squared)
    return _adaptive_update(global_weights, new_m, new_v, lr, tau), new_m, new_v


def _first_moment(m: Weights, mean_delta: Weights, beta1: float) -> Weights:
    return {
        key: beta1 * _f64(m[key]) + (1.0 - beta1) * _f64(delta) for key, delta in mean_delta.items()
    }


def _adaptive_update(
    global_weights: Weights, m: Weights, v: Weights, lr: float, tau: float
) -> Weights:
    """x_{t+1} = x_t + η·m_t / (√v_t + τ), per coordinate."""
    return {
        key: _cast_like(x, _f64(x) + lr * m[key] / (np.sqrt(v[key]) + tau))
        for key, x in global_weights.items()
    }


def _f64(arr: Array) -> Array:
    return np.asarray(arr, dtype=np.float64)


def _cast_like(reference: Array, value: Array) -> Array:
    return np.asarray(value, dtype=reference.dtype)
