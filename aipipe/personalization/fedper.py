"""`fedper`: federate the body, keep the head local (FedPer, Arivazhagan et al. 2019,
arXiv:1912.00818).

The study's `SplitModel` is `head(body(x))`: the `body.*` tensors are shared (sent, summed,
versioned at the hub), the one-logit `head` is the site's own. Each round trains both jointly
(`Personalizer.train_round`): the global body under the site's head, under `privacy.mode: dp`
with the same DP-SGD steps that make the shared update, so the head moves only inside them and
costs no ε of its own. The hub's head stays at its public seeded initialisation and means
nothing, so the global model alone predicts nothing (`global_predicts` False: the hub serves no
CDS for the study). `model.kind: logistic` has an identity body, nothing to federate: the
study is refused when it is read (`StudySpec`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from aipipe.personalization.base import Personalizer

BODY = "body."


class FedPer(Personalizer):
    name: ClassVar[str] = "fedper"
    global_predicts: ClassVar[bool] = False

    def shared(self, model: nn.Module) -> list[str]:
        """The body's tensors; the head is local."""
        return [name for name in model.state_dict() if name.startswith(BODY)]
