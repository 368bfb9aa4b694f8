"""`fedper`: federate the body, keep the head local (FedPer, Arivazhagan et al. 2019,
arXiv:1912.00818).

The study's `SplitModel` is `head(body(x))`: the `body.*` tensors are shared (sent, summed,
versioned at the hub), the one-logit `head` is the site's own. Each round trains both jointly
(`Personalizer.train_round`): the global body under the site's head, under `privacy.mode: dp`
with the same DP-SGD steps that make the shared update, so the head moves only inside them and
costs no ε of its own. The hub's head stays at its public seeded initialisation and means
nothing, so the global model alone predicts nothing (`global_predicts` False: the hub serves no
CDS for the study). The personal model refines the head on the fit split with the body frozen,
chosen on validation (`personalize`). `model.kind: logistic` has an identity body, nothing to
federate: the study is refused when it is read (`StudySpec`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from aipipe.models import SplitModel
from aipipe.models.serialization import Arrays, arrays_to_model
from aipipe.personalization.base import Personalizer, PersonalModel, SiteData
from aipipe.personalization.selection import frozen, refine_on_validation

BODY = "body."


class FedPer(Personalizer):
    name: ClassVar[str] = "fedper"
    global_predicts: ClassVar[bool] = False

    def shared(self, model: nn.Module) -> list[str]:
        """The body's tensors; the head is local."""
        return [name for name in model.state_dict() if name.startswith(BODY)]

    def personalize(
        self, model: nn.Module, state: Arrays, carry: Arrays, data: SiteData, *, seed: int
    ) -> PersonalModel:
        """The global body loaded in `model` under the site's head (the training state), the
        head refined on the fit split with the body frozen, the checkpoint chosen on validation
        loss (0 steps, the state as trained, a candidate). Under DP the state's head moved only
        inside noised steps; this refinement is free of noise and of ε because nothing shared
        ever reads it: it is not written back to the state (as FENDA's is not)."""
        if not isinstance(model, SplitModel):
            raise TypeError(f"fedper personalizes a SplitModel, not {type(model).__name__}")
        if state:
            arrays_to_model(state, model, strict=False)
        with frozen(model.body):
            return refine_on_validation(model, data, self.local_training(), seed=seed)
