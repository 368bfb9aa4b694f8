"""`none`: no personalization. Every parameter is shared and the site predicts with the global
model; the base class's defaults are exactly this."""

from __future__ import annotations

from typing import ClassVar

from aipipe.personalization.base import Personalizer


class NoPersonalization(Personalizer):
    name: ClassVar[str] = "none"
