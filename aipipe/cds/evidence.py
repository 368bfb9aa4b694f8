"""Which Observations a feature read, and why a feature has no value: the evidence a card cites.

These follow `aipipe.study.raw` to the letter (same code matching, unit conversion, date
cut-off and row order), so the basis named and the reason given describe what `raw_matrix` did.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from aipipe.fhir.codes import LOINC, SNOMED, convert_unit, token_matches
from aipipe.study.blocks import Feature


class ObsRow(NamedTuple):
    resource_id: str
    component: int
    code: str
    value: float | None
    unit: str | None
    effective: str | None


class CodeSet:
    """A feature's codes: exact tokens in a set, `*` prefixes tried one by one."""

    def __init__(self, codes: Iterable[str]) -> None:
        self.exact = frozenset(c for c in codes if not c.endswith("*"))
        self.prefixes = tuple(c for c in codes if c.endswith("*"))

    def matches(self, token: str) -> bool:
        return token in self.exact or any(token_matches(p, token) for p in self.prefixes)


def _on_or_before(row: ObsRow, reference: date | None) -> bool:
    return reference is None or row.effective is None or row.effective[:10] <= reference.isoformat()


def _recent(row: ObsRow, since: date | None) -> bool:
    return since is None or (row.effective is not None and row.effective[:10] >= since.isoformat())


def _converted(feature: Feature, row: ObsRow) -> float | None:
    target = feature.target_unit()
    if row.value is None or target is None:
        return row.value
    return convert_unit(row.value, row.unit, target, row.code)


def usable(
    feature: Feature, rows: list[ObsRow], reference: date | None, since: date | None = None
) -> list[ObsRow]:
    return [
        r
        for r in rows
        if _on_or_before(r, reference) and _recent(r, since) and _converted(feature, r) is not None
    ]


def basis(feature: Feature, usable: list[ObsRow]) -> tuple[str, ...]:
    """The Observations the feature's aggregation read (rows come in `raw_matrix`'s order)."""
    if not usable:
        return ()
    if feature.aggregation == "latest":
        chosen = [usable[-1]]
    elif feature.aggregation in ("min", "max"):
        pick = min if feature.aggregation == "min" else max
        chosen = [pick(usable, key=lambda r: _converted(feature, r) or 0.0)]
    else:
        chosen = usable
    return tuple(dict.fromkeys(r.resource_id for r in chosen))


def decode(feature: Feature, block: NDArray[np.float64]) -> float | None:
    if feature.kind == "numeric":
        return float(block[0])
    assert feature.levels is not None
    kept = feature.levels[1:] if feature.drop_first else feature.levels
    hits = [level for level, flag in zip(kept, block, strict=True) if flag == 1.0]
    if hits:
        return float(hits[0])
    return float(feature.levels[0]) if feature.drop_first else None


_SHORT_SYSTEMS = {LOINC: "LOINC", SNOMED: "SNOMED"}


def _code_names(feature: Feature) -> str:
    names = []
    for token in feature.all_codes()[:3]:
        system, _, code = token.partition("|")
        names.append(f"{_SHORT_SYSTEMS.get(system, system.rsplit('/', 1)[-1])} {code}")
    more = len(feature.all_codes()) - len(names)
    return ", ".join(names) + (f" (+{more})" if more > 0 else "")


def missing_reason(
    feature: Feature, rows: list[ObsRow], reference: date | None, since: date | None = None
) -> str:
    if not rows:
        return f"no Observation coded {_code_names(feature)}"
    valued = [r for r in rows if r.value is not None]
    if not valued:
        return "the Observation has no numeric value"
    dated = [r for r in valued if _on_or_before(r, reference)]
    if not dated:
        return f"only Observations after {reference.isoformat() if reference else 'the cut-off'}"
    recent = [r for r in dated if _recent(r, since)]
    if not recent:
        assert since is not None
        latest = max((r.effective or "")[:10] for r in dated) or "undated"
        return f"the latest is from {latest}, before the look-back window (from {since})"
    dated = recent
    units = sorted({str(r.unit) if r.unit is not None else "no unit" for r in dated})
    return (
        f"unit {', '.join(repr(u) for u in units)} cannot be converted to {feature.target_unit()}"
    )
