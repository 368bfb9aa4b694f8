"""Personalization: each site's own model beside the federated one (`Personalizer`), one class
per method behind a registry, as with aggregators.

    from aipipe.personalization import personalizer_for

    method = personalizer_for(spec)         # the study's `personalization:` block
    model = method.build(n_features, seed=0)
    method.shared(model)                    # the tensor names that are federated

The node trains and personalizes with it (`train_round`, `personalize`); the hub reads only the
split (`build`, `shared`, `global_predicts`).
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
