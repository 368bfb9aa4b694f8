"""`fenda`: FENDA-FL (Tavakoli et al. 2023, arXiv:2309.16825). The model is
`head(cat(global_extractor(x), local_extractor(x)))` (`aipipe.models.FendaModel`): the global
feature extractor is federated, the local extractor and the head never leave the node.

Shared: the global extractor's tensors only (`global_extractor.*`). Kept: the local extractor
and the head, as the training state (`RoundOutput.state`), which the next round trains from.

Training (the base `train_round`): the state is trained jointly with the global extractor, in
the same steps that make the shared update. Under `privacy.mode: dp` every step is one
clipped, noised DP-SGD step over all parameters, global and local; only the global part's Δ
leaves. The local part's values are therefore post-processing of noised steps too, and the
next round's shared gradient, taken at (new global, this state), is taken at parameters that
are public or DP outputs: the shared update stays a DP release, charged as a plain round is,
and the local part costs no ε of its own. Training the local part apart on raw gradients and
then feeding it into the next shared round would break that (base.py's docstring).

Personalizing: the new global extractor with the state, refined non-privately (local extractor
and head only; the global extractor frozen, so the hub-visible part is the version's) for up to
`settings.steps` steps, the checkpoint chosen on validation loss (0 a candidate). That
refinement is not written back to the state: nothing shared ever reads it.

The global model alone predicts nothing (its head is some site's, or none): `global_predicts`
is False, so the hub serves no CDS for such a study. The study's model must be `kind: mlp`
(`model.hidden` is the global extractor; `local_hidden`, or else `model.hidden`, the local one).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from aipipe.errors import StudyError
from aipipe.models.fenda import FendaModel, build_fenda
from aipipe.models.serialization import Arrays, arrays_to_model
from aipipe.personalization.base import Personalizer, PersonalModel, SiteData
from aipipe.personalization.selection import frozen, refine_on_validation

SHARED_PREFIX = "global_extractor."


class Fenda(Personalizer):
    name: ClassVar[str] = "fenda"
    global_predicts: ClassVar[bool] = False

    def build(self, n_features: int, *, seed: int | None = None) -> nn.Module:
        """A `FendaModel`: extractors of widths `model.hidden` (global) and `local_hidden`
        (local, `model.hidden` when empty), and a head over both."""
        if self.model.kind != "mlp" or not self.model.hidden:
            raise StudyError(
                f"personalization method 'fenda' needs a feature extractor, which model kind "
                f"'{self.model.kind}' without hidden layers lacks; use model kind: mlp with "
                "hidden layers (e.g. hidden: [32])"
            )
        local_hidden = self.settings.local_hidden or self.model.hidden
        return build_fenda(n_features, self.model.hidden, local_hidden, seed=seed)

    def shared(self, model: nn.Module) -> list[str]:
        return [name for name in model.state_dict() if name.startswith(SHARED_PREFIX)]

    def personalize(
        self, model: nn.Module, state: Arrays, carry: Arrays, data: SiteData, *, seed: int
    ) -> PersonalModel:
        """The global extractor loaded in `model` with the site's state, its local extractor
        and head refined on the fit split and chosen on validation."""
        if not isinstance(model, FendaModel):
            raise TypeError(f"fenda personalizes a FendaModel, not {type(model).__name__}")
        if state:
            arrays_to_model(state, model, strict=False)
        with frozen(model.global_extractor):
            return refine_on_validation(model, data, self.local_training(), seed=seed)
