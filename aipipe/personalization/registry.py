"""Name → personalization method, and the factory that builds one from a study."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from aipipe.errors import StudyError
from aipipe.personalization.base import Personalizer
from aipipe.personalization.ditto import Ditto
from aipipe.personalization.fedper import FedPer
from aipipe.personalization.fenda import Fenda
from aipipe.personalization.finetune import FineTuning
from aipipe.personalization.none import NoPersonalization
from aipipe.study.personal import Personalization
from aipipe.study.spec import StudySpec

PERSONALIZERS: Mapping[str, type[Personalizer]] = MappingProxyType(
    {cls.name: cls for cls in (NoPersonalization, FineTuning, FedPer, Fenda, Ditto)}
)
"""Every method a study may name in `personalization.method`."""


def personalizer_for(spec: StudySpec) -> Personalizer:
    """The method a study's `personalization:` block names (`none` without a block)."""
    settings = spec.personalization or Personalization()
    try:
        cls = PERSONALIZERS[settings.method]
    except KeyError:
        known = ", ".join(sorted(PERSONALIZERS))
        raise StudyError(
            f"study '{spec.name}' names personalization method '{settings.method}'; known: {known}"
        ) from None
    return cls(model=spec.model, settings=settings, training=spec.training, privacy=spec.privacy)
