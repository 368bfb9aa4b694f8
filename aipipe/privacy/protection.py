"""What an (ε, δ) guarantee means to a patient: the best membership-inference accuracy it allows.

A membership-inference attacker sees what left the node and guesses whether one patient's
record was in (H1) or out (H0), each a priori equally likely. (ε, δ)-DP is exactly a bound on
every such test: false-positive rate α and false-negative rate β satisfy
    α + e^ε·β ≥ 1 − δ   and   e^ε·α + β ≥ 1 − δ
(Kairouz, Oh & Viswanath 2015, "The composition theorem for differential privacy", ICML,
Theorem 2.1; Wasserman & Zhou 2010). Adding the two: (1 + e^ε)(α + β) ≥ 2(1 − δ), with equality
at α = β = (1 − δ)/(1 + e^ε), so a balanced attacker's accuracy 1 − (α + β)/2 is at most
    (e^ε + δ) / (1 + e^ε),
i.e. an advantage 2·acc − 1 ≤ (e^ε − 1 + 2δ)/(e^ε + 1) (Humphries et al. 2023, "Investigating
membership inference attacks under data dependencies", SaTML, Theorem 1). The bound is tight for
some mechanism with this (ε, δ); the subsampled Gaussian's full privacy profile may allow less.
"""

from __future__ import annotations

import math


def membership_accuracy_bound(epsilon: float, delta: float) -> float:
    """The highest accuracy any membership-inference attacker can reach at a 50/50 prior."""
    if epsilon < 0 or not (0 <= delta < 1):
        raise ValueError(f"need ε ≥ 0 and 0 ≤ δ < 1, got ε={epsilon}, δ={delta}")
    # (e^ε + δ)/(1 + e^ε) = 1 − (1 − δ)/(1 + e^ε); past ε = 700 e^ε overflows and the bound is 1.
    return 1.0 - (1.0 - delta) / (1.0 + math.exp(min(epsilon, 700.0)))
