"""Update-level attacks: pure functions of the attackers' honest update(s) and an rng, and the
`Attack` classes that send them.

- sign flip: −Δ, the honest step reversed.
- scale: k·Δ (model replacement, Bagdasaryan et al. 2020). The node still clips to
  `bounds.update_norm` before signing, so what scaling buys is only the distance between the
  honest ‖Δ‖ and that bound: k·Δ is cut back to norm `update_norm`. `scale_unclipped` skips the
  clip, and the plaintext hub refuses the update (its norm is signed and checked).
- noise: a Gaussian Δ with the given per-coordinate std, the honest update thrown away.
- ALIE, "A Little Is Enough" (Baruch et al. 2019): μ − z·σ per coordinate, μ and σ the mean
  and std of the colluding attackers' honest updates, z from the paper's formula for n and f.
- IPM, inner-product manipulation (Xie et al. 2020): −ε·μ, μ the mean of the colluders'
  honest updates (the non-omniscient variant: attackers see only their own updates).

A lone node's ALIE sends its own update (σ of one update is 0) and its IPM is −ε·Δ: both need
collusion, which the benchmark (`bench/robust.py`) models and a single node cannot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, ClassVar

import numpy as np

from aipipe.attacks.base import Arrays, Attack
from aipipe.errors import ConfigError


def sign_flip(delta: Arrays) -> Arrays:
    """−Δ."""
    return {k: -v for k, v in delta.items()}


def scale(delta: Arrays, factor: float) -> Arrays:
    """factor·Δ."""
    return {k: (v * factor).astype(v.dtype) for k, v in delta.items()}


def gaussian(delta: Arrays, std: float, rng: np.random.Generator) -> Arrays:
    """A draw of N(0, std²) per coordinate, shaped like Δ (Δ itself is not used)."""
    return {k: rng.normal(0.0, std, size=v.shape).astype(v.dtype) for k, v in delta.items()}


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019, §4: s = ⌊n/2 + 1⌋ − f honest updates must sit farther from the mean
    than the attack; z_max = Φ⁻¹((n − s) / n). n = 12, f = 4: s = 3, z = Φ⁻¹(0.75) ≈ 0.674."""
    if not 0 < f < n:
        raise ConfigError(f"ALIE needs 0 < f < n attackers, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - s) / n)


def alie(benign: Sequence[Arrays], z: float) -> Arrays:
    """μ − z·σ per coordinate over `benign` (σ the population std; 0 for a single update)."""
    _need(benign, "ALIE")
    out = {}
    for k, first in benign[0].items():
        stack = np.stack([np.asarray(b[k], dtype=np.float64) for b in benign])
        out[k] = (stack.mean(axis=0) - z * stack.std(axis=0)).astype(first.dtype)
    return out


def ipm(benign: Sequence[Arrays], epsilon: float) -> Arrays:
    """−ε·mean(benign)."""
    _need(benign, "IPM")
    out = {}
    for k, first in benign[0].items():
        mean = np.mean([np.asarray(b[k], dtype=np.float64) for b in benign], axis=0)
        out[k] = (-epsilon * mean).astype(first.dtype)
    return out


def _need(benign: Sequence[Arrays], what: str) -> None:
    if not benign:
        raise ConfigError(f"{what} needs at least one honest update to craft its own")


class SignFlip(Attack):
    name: ClassVar[str] = "sign_flip"
    level: ClassVar[str] = "update"

    def corrupt(self, own: Arrays, benign: Sequence[Arrays], rng: np.random.Generator) -> Arrays:
        return sign_flip(own)


class Scale(Attack):
    name: ClassVar[str] = "scale"
    level: ClassVar[str] = "update"

    def __init__(self, factor: float = 10.0) -> None:
        self.factor = factor

    def corrupt(self, own: Arrays, benign: Sequence[Arrays], rng: np.random.Generator) -> Arrays:
        return scale(own, self.factor)

    def settings(self) -> dict[str, Any]:
        return {"factor": self.factor, "clipped": not self.skips_clip}


class ScaleUnclipped(Scale):
    """k·Δ sent without the node's own clip: the plaintext hub refuses it past update_norm."""

    name: ClassVar[str] = "scale_unclipped"
    skips_clip: ClassVar[bool] = True


class Noise(Attack):
    name: ClassVar[str] = "noise"
    level: ClassVar[str] = "update"

    def __init__(self, std: float = 1.0) -> None:
        self.std = std

    def corrupt(self, own: Arrays, benign: Sequence[Arrays], rng: np.random.Generator) -> Arrays:
        return gaussian(own, self.std, rng)

    def settings(self) -> dict[str, Any]:
        return {"std": self.std}


class Alie(Attack):
    name: ClassVar[str] = "alie"
    level: ClassVar[str] = "update"

    def __init__(self, z: float = 1.0) -> None:
        self.z = z

    def corrupt(self, own: Arrays, benign: Sequence[Arrays], rng: np.random.Generator) -> Arrays:
        return alie(benign, self.z)

    def settings(self) -> dict[str, Any]:
        return {"z": self.z}


class Ipm(Attack):
    name: ClassVar[str] = "ipm"
    level: ClassVar[str] = "update"

    def __init__(self, epsilon: float = 0.5) -> None:
        self.epsilon = epsilon

    def corrupt(self, own: Arrays, benign: Sequence[Arrays], rng: np.random.Generator) -> Arrays:
        return ipm(benign, self.epsilon)

    def settings(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}
