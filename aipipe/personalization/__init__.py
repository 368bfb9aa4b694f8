"""Personalization: each site's own model beside the federated one (`Personalizer`), one class
per method behind a registry, as with aggregators.

    from aipipe.personalization import personalizer_for

    method = personalizer_for(spec)         # the study's `personalization:` block
    model = method.build(n_features, seed=0)
    method.shared(model)                    # the tensor names that are federated

The node trains and personalizes with it (`train_round`, `personalize`); the hub reads only the
split (`build`, `shared`, `global_predicts`).

Personalization methods (what each shares with the hub, what each keeps on the node):

* `none`: shares every parameter; keeps nothing; the site predicts with the global model.
* `finetune` (FLamby's FedAvgFineTuning): shares every parameter, trained as without
  personalization; keeps nothing between versions: the personal model is the global version
  after up to `steps` local non-DP steps, as many (0 included) as minimise validation loss.
* `fenda` (FENDA-FL, arXiv:2309.16825): `FendaModel`, a global and a local feature extractor
  concatenated into a head; shares the global extractor only; keeps the local extractor and the
  head as training state (trained jointly with the shared part, one DP-SGD step over all, so
  it costs no ε of its own); the personal model refines the local part on the fit split,
  chosen on validation. The global model alone predicts nothing (`global_predicts` False).
* `ditto` (Li et al. 2021): shares every parameter (w, trained as without personalization);
  keeps a personal model v (`carry`) trained non-privately on the fit loss plus
  λ/2·‖v − w‖² from the previous v, its checkpoint chosen on validation.

`fedper` and `fenda` need a model with hidden layers (`kind: mlp`): a study naming them with a
logistic model is refused. Every choice is made on the validation split
(`aipipe.personalization.selection`), never on test.
"""

from aipipe.personalization.base import (
    Personalizer,
    PersonalModel,
    RoundOutput,
    SiteData,
    restrict,
)
from aipipe.personalization.registry import PERSONALIZERS, personalizer_for

__all__ = [
    "PERSONALIZERS",
    "PersonalModel",
    "Personalizer",
    "RoundOutput",
    "SiteData",
    "personalizer_for",
    "restrict",
]
