"""`ditto` (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML): the global model w is federated exactly as without personalization
(the base `train_round`), and each site keeps a personal model v trained on

    F_k(v) + λ/2·‖v − w‖²

with w the current global version and λ = `settings.lam` (`train_local`'s proximal term anchored
at w). v persists across versions (`carry`): each `personalize` continues it from the previous
v (from w the first time) for up to `settings.steps` non-DP steps on the fit split, the
checkpoint chosen on validation loss. λ → ∞ pins v to w (the global model); λ = 0 is local
training from where v was.

Shared: every parameter (w). Kept: v, as `carry`; it never leaves the node, and nothing shared
reads it, so its training costs no ε.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from torch import nn

from aipipe.models.serialization import Arrays, arrays_to_model, weights_to_arrays
from aipipe.personalization.base import Personalizer, PersonalModel, SiteData
from aipipe.personalization.selection import refine_on_validation


class Ditto(Personalizer):
    name: ClassVar[str] = "ditto"

    def personalize(
        self, model: nn.Module, state: Arrays, carry: Arrays, data: SiteData, *, seed: int
    ) -> PersonalModel:
        """v from `carry` (else the global weights loaded in `model`), trained on the fit loss
        plus λ/2‖v − w_global‖²; the new v is the result's `carry`."""
        if state:
            arrays_to_model(state, model, strict=False)
        global_weights = weights_to_arrays(model)
        if carry:
            arrays_to_model(carry, model)
        personal = refine_on_validation(
            model,
            data,
            self.local_training(),
            seed=seed,
            anchor=global_weights,
            mu=self.settings.lam,
        )
        return replace(personal, carry=personal.weights)
