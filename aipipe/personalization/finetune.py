"""`finetune`: FLamby's FedAvgFineTuning (Ogier du Terrail et al. 2022). The whole model is
federated exactly as without personalization; each site's own model is the current global
model after a few local, non-private steps on its fit split, as many (0 included) as give the
lowest validation loss (`aipipe.personalization.selection`).

Shared: every parameter. Kept: nothing between rounds (each version is fine-tuned afresh).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from aipipe.models.serialization import Arrays, arrays_to_model
from aipipe.personalization.base import Personalizer, PersonalModel, SiteData
from aipipe.personalization.selection import refine_on_validation


class FineTuning(Personalizer):
    name: ClassVar[str] = "finetune"

    def personalize(
        self, model: nn.Module, state: Arrays, carry: Arrays, data: SiteData, *, seed: int
    ) -> PersonalModel:
        """Up to `settings.steps` non-DP steps from the global weights loaded in `model`, the
        checkpoint chosen on validation loss (0 steps, the global model, is a candidate)."""
        if state:
            arrays_to_model(state, model, strict=False)
        return refine_on_validation(model, data, self.local_training(), seed=seed)
