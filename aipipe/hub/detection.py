"""The hub's flag rule for one plaintext round's updates (a malicious institution): pure maths.

The geometry is `aipipe.aggregation.anomaly`'s, the one scoring module: the reference is the
coordinate-wise median of the round's deltas (`robust_reference`), which fewer than half of the
updates cannot move far, and each update gets its distance ‖Δᵢ − ref‖, its norm ‖Δᵢ‖ and its
cosine to the reference (`update_scores`). This module only decides which updates are outliers
(`score_updates`): one whose robust z-score of distance, of norm or of direction (1 − cosine)
exceeds the study's threshold is flagged:

    z(x) = (x − median(x)) / (1.4826 · MAD(x))        MAD(x) = median(|x − median(x)|)

1.4826 · MAD estimates a normal sample's standard deviation without being moved by outliers
(Iglewicz and Hoaglin's modified z-score; 3.5 their cut-off). Only large values count: a short,
close or well-aligned update is never flagged.

Scale floors. With a handful of sites, or sites of unequal size, the MAD understates how far
honest updates spread: three hospitals' nearly alike DP updates gave an honest one 9 % longer
than the others a z-score of 3.8, and on Fed-Heart-Disease in 12 sites (bench/robust.py) the
10-row Swiss sites' honest updates reach 1.9 × the round's median norm, which a floor of a
tenth flagged in 9 % of clean updates (and reputation then shut those sites out). So the scale
of distance and norm is never below 0.3 × the round's median update norm: at 3.5 a deviation
under 1.05 × the median norm is never flagged (an update must be past about 2 × the median
norm), while a ×10 update scores about 30; the benchmark's clean-run false flags fall to 0 and
its noise and scaling recall is unchanged. The scale of 1 − cosine, which is already relative
and lies in [0, 2], is never below 0.5: a direction is flagged only when its 1 − cosine exceeds
the round's median by more than 1.75, i.e. when it points nearly opposite to a round whose
updates agree (median cosine near 1). With a floor of 0.1 the benchmark's honest Cleveland and
Hungarian parts, left in a round of 8 once the attackers were shut out, scored 3.5 to 8 against
the 5 Swiss and VA parts that made the median, and reputation shut them out in turn.
Where the scale is 0 even so (more than half of the values equal) the mean absolute deviation
from the median, times 1.2533, stands in; where every value is equal no update is flagged.

Why direction, and why as a z-score rather than a fixed cosine floor. A sign-flipped or
inner-product-manipulation update points against the reference (cosine ≈ −1) with an ordinary
norm, and when the honest updates agree with one another (cosines near 1) its distance alone may
not stand out. But how much honest sites agree depends on the study: on Fed-Heart-Disease split
into 12 sites (bench/robust.py) the honest updates' cosines to the round's median run from −0.7 to
+0.8 (non-IID hospitals; the updates shrink and scatter as the model converges), so a floor such as
"cosine < 0" would flag many honest updates. The z-score flags a direction only when it is an
outlier among the round's own directions: it catches a flip among agreeing sites and stays
quiet among disagreeing ones — where, equally, a flipped update cannot be told from an honest
one by its direction (the benchmark's sign-flip recall, near 0, says how often that is). Noise
of an ordinary norm (cosine ≈ 0) is given away by its distance where the honest updates are
consistent with one another, not by its direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from aipipe.aggregation.anomaly import robust_reference, update_scores

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): MAD of a normal sample × this = its σ
MEAN_AD_TO_SIGMA = 1.2533  # √(π/2): mean absolute deviation of a normal sample × this = its σ
MIN_RELATIVE_SCALE = 0.3  # distance/norm: the scale is at least this × the median update norm
MIN_DIRECTION_SCALE = 0.5  # 1 − cosine (in [0, 2]): the scale is at least this


@dataclass(frozen=True)
class UpdateScore:
    """One update's scores in its round, and whether the rule flags it."""

    distance: float
    norm: float
    cosine: float
    z_distance: float
    z_norm: float
    z_direction: float
    flagged: bool

    def as_dict(self) -> dict[str, Any]:
        """Rounded for the audit log and the lineage (canonical JSON: finite floats only)."""
        out: dict[str, Any] = {
            k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()
        }
        return out


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


def score_updates(
    deltas: Sequence[Mapping[str, npt.NDArray[Any]]], threshold: float
) -> list[UpdateScore]:
    """Every update's scores against the round's median (`aipipe.aggregation.anomaly`), flagged
    when its z-score of distance, norm or direction exceeds `threshold`."""
    if not deltas:
        return []
    geometry = update_scores(deltas, robust_reference(deltas))
    distances = [g.distance for g in geometry]
    norms = [g.norm for g in geometry]
    turns = [1.0 - g.cosine for g in geometry]
    floor = MIN_RELATIVE_SCALE * float(np.median(norms))
    z_distances, z_norms = robust_z(distances, floor), robust_z(norms, floor)
    z_directions = robust_z(turns, MIN_DIRECTION_SCALE)
    return [
        UpdateScore(
            distance=g.distance,
            norm=g.norm,
            cosine=g.cosine,
            z_distance=zd,
            z_norm=zn,
            z_direction=za,
            flagged=max(zd, zn, za) > threshold,
        )
        for g, zd, zn, za in zip(geometry, z_distances, z_norms, z_directions, strict=True)
    ]


def updated_reputation(previous: float, flagged: bool, decay: float) -> float:
    """r ← decay·r + (1 − decay)·(0 if flagged else 1): an exponential average of clean rounds."""
    return decay * previous + (1.0 - decay) * (0.0 if flagged else 1.0)
