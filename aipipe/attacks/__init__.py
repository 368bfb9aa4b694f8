"""The malicious-node harness (issue 14): poisoning behaviours for tests and benchmarks only.

    from aipipe.attacks import parse_attack

    attack = parse_attack("scale:100")          # NAME[:PARAM]
    result = attack.run(train, x, y, update_norm, rng)

No study enables an attack; a node runs one only under the hidden `aipipe node start --attack`.
The worker applies it at its one training call site, before clipping and signing, in every
`secure:` mode; it is tested with plaintext studies (under SecAgg+ and CKKS `contribution()`
clips the update again, so `scale_unclipped` is clipped there). A data-level attack under DP
trains on its changed rows with the σ planned for its real ones: the attacker's own ledger is
not what these attacks are about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from aipipe.attacks.base import Attack, with_delta
from aipipe.attacks.data import Backdoor, LabelFlip, add_trigger, backdoor, label_flip
from aipipe.attacks.updates import (
    Alie,
    Ipm,
    Noise,
    Scale,
    ScaleUnclipped,
    SignFlip,
    alie,
    alie_z,
    gaussian,
    ipm,
    scale,
    sign_flip,
)
from aipipe.errors import ConfigError

ATTACKS: Mapping[str, type[Attack]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (SignFlip, Scale, ScaleUnclipped, Noise, LabelFlip, Alie, Ipm, Backdoor)
    }
)
"""Every attack by name; the optional PARAM is the first constructor argument."""


def parse_attack(text: str) -> Attack:
    """`NAME` or `NAME:PARAM` (a number: scale's factor, noise's std, ALIE's z, IPM's ε,
    backdoor's poisoned fraction) → an `Attack`."""
    name, _, param = text.partition(":")
    cls = ATTACKS.get(name)
    if cls is None:
        raise ConfigError(f"unknown attack '{name}'; known: {', '.join(sorted(ATTACKS))}")
    if not param:
        return cls()
    try:
        value = float(param)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"attack parameter {param!r} of '{name}' is not a finite number")
    try:
        return cls(value)  # type: ignore[call-arg]
    except TypeError:
        raise ConfigError(f"attack '{name}' takes no parameter, got {param!r}") from None


__all__ = [
    "ATTACKS",
    "Alie",
    "Attack",
    "Backdoor",
    "Ipm",
    "LabelFlip",
    "Noise",
    "Scale",
    "ScaleUnclipped",
    "SignFlip",
    "add_trigger",
    "alie",
    "alie_z",
    "backdoor",
    "gaussian",
    "ipm",
    "label_flip",
    "parse_attack",
    "scale",
    "sign_flip",
    "with_delta",
]
