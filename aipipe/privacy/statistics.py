"""Preprocessing statistics under DP: noised count, Σx and Σx² of clipped columns.

The hub scores patients for CDS with the sites' pooled train mean and std. Exact per-site
counts and moments leak rows (the count of a binary column; with n − 1 rows known, the last
patient's values), so a node releases them only through the Gaussian mechanism:

* each column j is clipped to the range [loⱼ, hiⱼ] the study declares and rescaled to
  uⱼ = (clip(xⱼ) − loⱼ) / (hiⱼ − loⱼ) ∈ [0, 1];
* the released vector is v = Σ_rows (1, u₁ … u_d, u₁² … u_d²) + N(0, σ² I).

Sensitivity. The DP unit is one patient, who is one row of the matrix. Adding or removing a
row changes v by that row's contribution (1, u, u²), whose L2 norm is at most
√(1 + d·1² + d·1²) = √(1 + 2d) because every uⱼ and uⱼ² lies in [0, 1]. (Replacing a row —
also what the node's subsampling to max_examples can turn an added row into — changes v by at
most √(2d), less.) So Δ₂ = √(1 + 2d), and σ = z·Δ₂ with z the noise multiplier the accountant
calibrates for the statistics' (ε, δ) at q = 1 and one step: exactly the Gaussian mechanism
the ledger charges as (z, q = 1, steps = 1).

Floating point: a textbook Gaussian draw in binary floating point is open to Mironov-style
attacks on the low-order bits (Mironov 2012, for Laplace; the same idea applies here). We do
not defend against them; the noise is large next to any such leak at these scales, and the
DP-SGD noise has the same exposure.

Everything the hub derives from v (means, stds, fills) is post-processing: it floors the
variance, never divides by a noised count below 1, and keeps means inside the declared range.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aipipe.privacy.accountant import AccountantName, calibrate_noise

STATISTICS = "statistics"  # the ledger kind of this release
STATISTICS_ROUND = 0  # one release per study, charged as round 0
Range = tuple[float, float]


def sensitivity(columns: int) -> float:
    """L2 sensitivity of (count, Σu, Σu²) over `columns` columns rescaled to [0, 1]."""
    return math.sqrt(1 + 2 * columns)


def noise_multiplier(epsilon: float, delta: float, accountant: AccountantName) -> float:
    """z = σ/Δ of a single Gaussian release (q = 1, one step) that costs (ε, δ)."""
    return calibrate_noise(epsilon, delta, 1.0, 1, accountant)


@dataclass(frozen=True)
class NoisedSums:
    """A (noised) count and per-column Σx, Σx² in the columns' own units."""

    n: float
    sums: list[float]
    squares: list[float]


def release(
    x: NDArray[np.float64], ranges: Sequence[Range], *, multiplier: float, max_rows: int
) -> NoisedSums:
    """Noised sufficient statistics of the rows of `x` (one patient per row).

    A site with more than `max_rows` rows releases those of a random subset of that size (its
    weight in the pool is bounded like an update's). The noise comes from a fresh secret seed:
    anyone who could recompute it could subtract it.
    """
    rng = np.random.default_rng(secrets.randbits(128))
    if len(x) > max_rows:
        x = x[rng.permutation(len(x))[:max_rows]]
    lo, width = _bounds(ranges)
    u = (np.clip(x, lo, lo + width) - lo) / width
    exact = np.concatenate([[float(len(u))], u.sum(axis=0), (u**2).sum(axis=0)])
    sigma = multiplier * sensitivity(len(ranges))
    noised = exact + rng.normal(0.0, sigma, size=exact.shape)
    return _to_units(noised, lo, width)


def _to_units(
    v: NDArray[np.float64], lo: NDArray[np.float64], w: NDArray[np.float64]
) -> NoisedSums:
    """(n, Σu, Σu²) → (n, Σx, Σx²) with x = lo + w·u: Σx = lo·n + w·Σu and
    Σx² = lo²·n + 2·lo·w·Σu + w²·Σu² (post-processing of the noised vector)."""
    d = len(lo)
    n, su, suu = float(v[0]), v[1 : d + 1], v[d + 1 :]
    sx = lo * n + w * su
    sxx = lo**2 * n + 2 * lo * w * su + w**2 * suu
    return NoisedSums(n, [float(s) for s in sx], [float(s) for s in sxx])


def moments(
    total: NoisedSums, ranges: Sequence[Range]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean and (ddof = 1) std per column from pooled noised sums.

    The count is floored at 2 before dividing (a noised count can be small or negative);
    means are kept inside the declared range; the variance is floored at (10⁻³·width)² and
    capped at (width/2)², the largest a variable inside [lo, hi] can have.
    """
    lo, width = _bounds(ranges)
    n = max(total.n, 2.0)
    mean = np.clip(np.asarray(total.sums) / n, lo, lo + width)
    var = (np.asarray(total.squares) - n * mean**2) / (n - 1)
    var = np.clip(var, (1e-3 * width) ** 2, (width / 2) ** 2)
    return mean, np.sqrt(var)


def pool(parts: Sequence[NoisedSums]) -> NoisedSums:
    """Several sites' noised sums added up: the sums of the union, plus the sum of the noise."""
    d = len(parts[0].sums)
    return NoisedSums(
        sum(p.n for p in parts),
        [sum(p.sums[j] for p in parts) for j in range(d)],
        [sum(p.squares[j] for p in parts) for j in range(d)],
    )


def _bounds(ranges: Sequence[Range]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    lo = np.asarray([r[0] for r in ranges], np.float64)
    hi = np.asarray([r[1] for r in ranges], np.float64)
    return lo, hi - lo
