"""Secure mode → round protocol class, and the hub's one instance of each."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

from aipipe.errors import StudyError
from aipipe.hub.rounds.ckks import CkksRound
from aipipe.hub.rounds.context import RoundContext
from aipipe.hub.rounds.plain import PlainRound
from aipipe.hub.rounds.protocol import RoundProtocol
from aipipe.hub.rounds.secagg import SecAggRound
from aipipe.study.spec import StudySpec
from aipipe.wire import SecureMode

PROTOCOLS: Mapping[SecureMode, type[RoundProtocol]] = MappingProxyType(
    {cls.mode: cls for cls in (PlainRound, SecAggRound, CkksRound)}
)
"""Every round protocol a study's `secure:` may name."""

P = TypeVar("P", bound=RoundProtocol)


class Protocols:
    """One protocol instance per mode, sharing the hub's `RoundContext` (a protocol may keep
    per-round state in memory, such as a SecAgg+ round's coordinator)."""

    def __init__(self, ctx: RoundContext) -> None:
        self._by_mode = {mode: cls(ctx) for mode, cls in PROTOCOLS.items()}

    def for_spec(self, spec: StudySpec) -> RoundProtocol:
        try:
            return self._by_mode[SecureMode(spec.secure)]
        except (KeyError, ValueError):
            known = ", ".join(sorted(PROTOCOLS))
            why = f"no round protocol for secure: {spec.secure}; known: {known}"
            raise StudyError(why) from None

    def of(self, cls: type[P]) -> P:
        """The instance of one protocol class (for its own HTTP steps)."""
        found = self._by_mode[cls.mode]
        assert isinstance(found, cls)
        return found
