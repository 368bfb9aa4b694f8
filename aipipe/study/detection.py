"""A study's `detection:` block: how the hub screens each plaintext round's updates for a
malicious institution, and how a node's reputation keeps a repeat offender out of rounds.

    detection:
      threshold: 3.5          # robust z-score past which an update is flagged
      exclude: true           # flagged updates are left out of the aggregate
      reputation_decay: 0.5   # r ← decay·r + (1 − decay)·(0 if flagged else 1)
      reputation_floor: 0.5   # a node under it is not selected until an admin readmits it

Per round the hub takes the coordinate-wise median of the deltas as the reference and scores
each update by its distance to the reference, its norm and its cosine to the reference
(`aipipe.aggregation.anomaly`). An update is flagged when the robust z-score of its distance, of
its norm or of its direction (1 − cosine), (x − median) / (1.4826 · MAD) over the round's
updates, exceeds `threshold` (3.5: Iglewicz and Hoaglin's rule for outliers); the scale is at
least 0.3 × the median norm for distance and norm, 0.5 for 1 − cosine (`aipipe.hub.detection`
says why). Only large values count, and a round's updates are never all left out. Only
plaintext studies can screen: under `secure: secagg | ckks` the hub never sees a single update,
so a study with both is refused.
"""

from __future__ import annotations

from pydantic import Field

from aipipe.study.blocks import StudyBlock


class Detection(StudyBlock):
    threshold: float = Field(default=3.5, gt=0, le=1e6, allow_inf_nan=False)
    exclude: bool = True
    reputation_decay: float = Field(default=0.5, ge=0, lt=1)
    reputation_floor: float = Field(default=0.5, ge=0, le=1)
