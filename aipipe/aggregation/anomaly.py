"""Per-update anomaly scores against a robust reference, for flagging malicious updates.

    reference = robust_reference(deltas)           # coordinate-wise median of the round
    for score in update_scores(deltas, reference):  # one (distance, norm, cosine) per delta
        ...

The names and the meaning of the three numbers are stable: the hub's detection uses them.
Every number is computed over the whole flattened model in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from aipipe.aggregation.base import AggregationError, Array, Weights, _checked_like, _checked_model
from aipipe.aggregation.robust import coordinate_median, flatten, unflatten


class UpdateScore(NamedTuple):
    """How far one update sits from the round's robust reference.

    `distance` is ‖Δ − ref‖₂, `norm` is ‖Δ‖₂, `cosine` is ⟨Δ, ref⟩ / (‖Δ‖₂·‖ref‖₂), and 0.0
    when either norm is zero (no direction to compare).
    """

    distance: float
    norm: float
    cosine: float


def robust_reference(deltas: Sequence[Mapping[str, Array]]) -> Weights:
    """The coordinate-wise median of `deltas` (float64, the first delta's names and shapes).

    All deltas must share names and shapes and be finite; an empty list is refused.
    """
    if not deltas:
        raise AggregationError("robust_reference needs at least one update, got none")
    first = _checked_model(deltas[0])
    keys = list(first)
    matrix = np.stack(
        [flatten(_checked_like(first, d, what=f"update {i}"), keys) for i, d in enumerate(deltas)]
    )
    return unflatten(coordinate_median(matrix), first)


def update_scores(
    deltas: Sequence[Mapping[str, Array]], reference: Mapping[str, Array]
) -> list[UpdateScore]:
    """One `UpdateScore` per delta, in order, against `reference` (e.g. `robust_reference`)."""
    ref_checked = _checked_model(reference)
    keys = list(ref_checked)
    ref = flatten(ref_checked, keys)
    ref_norm = float(np.linalg.norm(ref))
    scores = []
    for i, delta in enumerate(deltas):
        vector = flatten(_checked_like(ref_checked, delta, what=f"update {i}"), keys)
        norm = float(np.linalg.norm(vector))
        denominator = norm * ref_norm
        cosine = float(vector @ ref) / denominator if denominator > 0 else 0.0
        distance = float(np.linalg.norm(vector - ref))
        scores.append(UpdateScore(distance, norm, min(1.0, max(-1.0, cosine))))
    return scores
