"""The study's `personalization:` block: how each site turns the federated model into its own.

    personalization:
      method: fedper          # none | finetune | fedper | fenda | ditto
      validation_fraction: 0.2
      steps: 20               # local steps of the personal part (finetune: the most tried)
      lr: null                # null: training.lr
      lam: 0.1                # ditto's λ in λ/2·‖v − w_global‖²
      local_hidden: []        # fenda's local feature extractor; empty: model.hidden

Only the shared part of the model is federated (DP-accounted, clipped, summed in clear or
securely, by any aggregator); the rest is the site's own and never leaves the node
(`aipipe.personalization`). `validation_fraction` carves a validation split out of each site's
train split, deterministically (`aipipe.study.features`); personal checkpoints and
hyper-parameters are chosen on it, never on the test split.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from aipipe.study.blocks import StudyBlock

METHODS = ("none", "finetune", "fedper", "fenda", "ditto")
"""Every method a study may name; `aipipe.personalization.PERSONALIZERS` has one class each."""

Method = Literal["none", "finetune", "fedper", "fenda", "ditto"]


class Personalization(StudyBlock):
    method: Method = "none"
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    steps: int = Field(default=20, gt=0, le=10_000)
    lr: float | None = Field(default=None, gt=0)
    lam: float = Field(default=0.1, ge=0)
    local_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
