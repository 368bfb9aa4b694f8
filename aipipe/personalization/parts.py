"""Which tensors of a study's model are federated, for the hub and the node alike.

The hub keeps every tensor of the method's architecture in each model version (version 0 is
`method.build(n, seed=0)`), but only the shared ones ever change: updates carry exactly those,
secure rounds lay out and sum exactly those, and a new version is its base with the shared part
replaced. The local tensors at the hub stay at their public seeded init and mean nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aipipe.models import weights_to_arrays
from aipipe.models.serialization import Arrays
from aipipe.personalization.registry import personalizer_for
from aipipe.study.spec import StudySpec

_LOCAL: dict[str, frozenset[str]] = {}  # study digest → its local (never shared) names


def initial_weights(spec: StudySpec) -> Arrays:
    """Version 0: every tensor of the method's architecture, at the public seeded init."""
    return weights_to_arrays(personalizer_for(spec).build(len(spec.columns()), seed=0))


def local_names(spec: StudySpec) -> frozenset[str]:
    """The names of the study's tensors that never leave a node (none without personalization)."""
    digest = spec.digest()
    names = _LOCAL.get(digest)
    if names is None:
        method = personalizer_for(spec)
        names = frozenset(method.local(method.build(len(spec.columns()), seed=0)))
        _LOCAL[digest] = names
    return names


def shared_part(spec: StudySpec, weights: Mapping[str, np.ndarray]) -> Arrays:
    """The federated tensors of `weights` (a version's, or a whole model's): all of them but
    the method's local part."""
    local = local_names(spec)
    return {name: value for name, value in weights.items() if name not in local}


def with_shared(base: Mapping[str, np.ndarray], shared: Mapping[str, np.ndarray]) -> Arrays:
    """A new version's weights: `base` with its shared part replaced by `shared`."""
    return {**base, **shared}
