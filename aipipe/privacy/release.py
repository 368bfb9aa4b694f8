"""The DP release of a node's evaluation of a model: noised counts, never exact ones.

An exact (n_test, accuracy) pair for a crafted model reveals the number of positive test labels,
and AUC or loss with side knowledge a single patient's label. What may leave instead is the
Gaussian mechanism on the count vector (n_test, n_correct): adding or removing one test row moves
n_test by 1 and n_correct by at most 1, so its L2 sensitivity is √2 (Dwork & Roth 2014, §3.5.3);
AUC and loss have no such small bound and are not released at all.

A release with noise σ·√2 on each count is one Gaussian step at sampling rate 1, i.e. the ledger
step (noise_multiplier=σ, sample_rate=1.0, steps=1); it must be charged to the site's ledger, in
the same transaction that records what left, before it is sent. Until the site ledger records
such releases, nodes send no evaluation numbers at all (`aipipe.node.worker`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aipipe.privacy.accountant import AccountantName, Step, compose_epsilon

COUNT_SENSITIVITY = math.sqrt(2.0)  # L2 change of (n_test, n_correct) from one test row


@dataclass(frozen=True)
class NoisedAccuracy:
    n: float  # noised n_test
    correct: float  # noised number of correct predictions

    @property
    def accuracy(self) -> float | None:
        """Post-processing of the noised counts (free under DP), clipped to [0, 1]."""
        return None if self.n < 1 else min(max(self.correct / self.n, 0.0), 1.0)


def evaluation_step(noise_multiplier: float) -> Step:
    """What the ledger records for one release: a Gaussian step at sampling rate 1."""
    if noise_multiplier <= 0:
        raise ValueError(f"a DP release needs a noise multiplier > 0, got {noise_multiplier}")
    return (noise_multiplier, 1.0, 1)


def evaluation_epsilon(noise_multiplier: float, delta: float, accountant: AccountantName) -> float:
    """ε of one release on its own (the ledger composes it with everything else)."""
    return compose_epsilon([evaluation_step(noise_multiplier)], delta, accountant)


def noised_accuracy_counts(
    n_test: int, n_correct: int, noise_multiplier: float, rng: np.random.Generator
) -> NoisedAccuracy:
    """(n_test, n_correct) with N(0, (σ·√2)²) noise on each; `rng` must be secret and fresh."""
    evaluation_step(noise_multiplier)
    scale = noise_multiplier * COUNT_SENSITIVITY
    noise = rng.normal(0.0, scale, size=2)
    return NoisedAccuracy(n=float(n_test + noise[0]), correct=float(n_correct + noise[1]))
