"""What the hub shows and serves of a personalized study (`personalization:`).

Its model versions hold every tensor of the method's architecture, but only the shared ones
change (`aipipe.personalization.parts`). A method whose global model alone predicts nothing
(`global_predicts` False: FedPer's head, FENDA's local parts never trained at the hub) gets no
CDS service at the hub; each node serves its own personal model.
"""

from __future__ import annotations

from typing import Any

from aipipe.personalization import personalizer_for
from aipipe.study.spec import StudySpec

PERSONALIZED = "personalized: served at each node by `aipipe node serve-cds`"
"""Why the hub's CDS withholds a study whose global model is no predictor (`cds.withheld`)."""


def withheld_reason(spec: StudySpec) -> str | None:
    """Why the hub's CDS must not serve the study's global model at all; None if it may."""
    return None if personalizer_for(spec).global_predicts else PERSONALIZED


def personalization_card(spec: StudySpec) -> dict[str, Any] | None:
    """The study's method and which tensors of its versions are federated (None: not
    personalized), for `aipipe model show`."""
    method = personalizer_for(spec)
    if method.name == "none":
        return None
    model = method.build(len(spec.columns()), seed=0)
    return {
        "method": method.name,
        "shared": method.shared(model),
        "local": method.local(model),
        "hub_cds": withheld_reason(spec) or "the global model",
    }
