"""Scoring one plaintext round's updates for a malicious institution: pure maths, no store.

The reference is the coordinate-wise median of the round's deltas (`reference`), which fewer
than half of the updates cannot move far. Each update is scored by its distance to it
‖Δᵢ − ref‖, its norm ‖Δᵢ‖ and its cosine to it (`score_updates`). An update is flagged when the
robust z-score of its distance or of its norm exceeds the study's threshold:

    z(x) = (x − median(x)) / (1.4826 · MAD(x))        MAD(x) = median(|x − median(x)|)

1.4826 · MAD estimates a normal sample's standard deviation without being moved by outliers
(Iglewicz and Hoaglin's modified z-score; 3.5 their cut-off). Only large values count: a short
or close update is never flagged. The scale is never below a tenth of the round's median update
norm: with a handful of sites whose updates are nearly alike the MAD can be tiny, and an honest
update 9 % longer than the others scored 3.8 (three hospitals' DP updates); so at 3.5 a
deviation under 0.35 × the median norm is never flagged, while a ×10 update scores about 90.
Where that floor is 0 too (more than half of the updates are 0) the mean absolute deviation
from the median, times 1.2533, stands in for the scale; where every value is equal no update is
flagged. The cosine is reported, not used by the rule: a sign-flipped update is already far
from the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): MAD of a normal sample × this = its σ
MEAN_AD_TO_SIGMA = 1.2533  # √(π/2): mean absolute deviation of a normal sample × this = its σ
MIN_RELATIVE_SCALE = 0.1  # the scale is at least this fraction of the median update norm


@dataclass(frozen=True)
class UpdateScore:
    """One update's scores in its round, and whether the rule flags it."""

    distance: float
    norm: float
    cosine: float
    z_distance: float
    z_norm: float
    flagged: bool

    def as_dict(self) -> dict[str, Any]:
        """Rounded for the audit log and the lineage (canonical JSON: finite floats only)."""
        out: dict[str, Any] = {
            k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()
        }
        return out


def flatten(delta: Mapping[str, npt.NDArray[Any]]) -> Vector:
    """A delta's tensors as one float64 vector, in the order of their names."""
    return np.concatenate([np.ravel(delta[k]).astype(np.float64) for k in sorted(delta)])


def reference(vectors: Sequence[Vector]) -> Vector:
    """The coordinate-wise median of the round's flattened deltas."""
    return np.asarray(np.median(np.stack(vectors), axis=0), dtype=np.float64)


def robust_z(values: Sequence[float], min_scale: float = 0.0) -> list[float]:
    """(x − median) / scale for each value: scale max(1.4826·MAD, `min_scale`), else (both 0)
    1.2533·mean |x − median|, else (every value equal) every z is 0."""
    x = np.asarray(values, dtype=np.float64)
    centre = float(np.median(x))
    deviations = np.abs(x - centre)
    scale = max(MAD_TO_SIGMA * float(np.median(deviations)), min_scale)
    if scale <= 0:
        scale = MEAN_AD_TO_SIGMA * float(np.mean(deviations))
    if scale <= 0:
        return [0.0] * len(x)
    return [float(v) for v in (x - centre) / scale]


def cosine(a: Vector, b: Vector) -> float:
    """cos(a, b); 0 when either is the zero vector."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def score_updates(vectors: Sequence[Vector], threshold: float) -> list[UpdateScore]:
    """Every update's scores against the round's median, flagged by the robust rule."""
    if not vectors:
        return []
    ref = reference(vectors)
    distances = [float(np.linalg.norm(v - ref)) for v in vectors]
    norms = [float(np.linalg.norm(v)) for v in vectors]
    floor = MIN_RELATIVE_SCALE * float(np.median(norms))
    z_distances, z_norms = robust_z(distances, floor), robust_z(norms, floor)
    return [
        UpdateScore(
            distance=d,
            norm=n,
            cosine=cosine(v, ref),
            z_distance=zd,
            z_norm=zn,
            flagged=zd > threshold or zn > threshold,
        )
        for v, d, n, zd, zn in zip(vectors, distances, norms, z_distances, z_norms, strict=True)
    ]


def updated_reputation(previous: float, flagged: bool, decay: float) -> float:
    """r ← decay·r + (1 − decay)·(0 if flagged else 1): an exponential average of clean rounds."""
    return decay * previous + (1.0 - decay) * (0.0 if flagged else 1.0)
