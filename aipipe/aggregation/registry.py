"""Name → aggregator class, and the factory that builds one from a study's settings."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from aipipe.aggregation.base import AggregationError, Aggregator
from aipipe.aggregation.fedavg import FedAvg
from aipipe.aggregation.fedopt import FedAdam, FedYogi
from aipipe.aggregation.fedprox import FedProx
from aipipe.aggregation.robust_aggregators import CenteredClip, CoordinateMedian, Krum, TrimmedMean

if TYPE_CHECKING:
    from aipipe.study.blocks import Aggregation

AGGREGATORS: Mapping[str, type[Aggregator]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            FedAvg,
            FedProx,
            FedAdam,
            FedYogi,
            TrimmedMean,
            CoordinateMedian,
            Krum,
            CenteredClip,
        )
    }
)
"""Every aggregator a study may name in `aggregation.name`."""


def make_aggregator(name: str, **knobs: float) -> Aggregator:
    """A new aggregator by registry name, with its keyword-only knobs (validated on entry)."""
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        known = ", ".join(sorted(AGGREGATORS))
        raise AggregationError(f"unknown aggregator '{name}'; known: {known}") from None
    accepted = knob_names(cls)
    unknown = sorted(set(knobs) - set(accepted))
    if unknown:
        raise AggregationError(
            f"{name} does not take {', '.join(unknown)}; it takes: {', '.join(accepted) or 'none'}"
        )
    return cls(**knobs)


def aggregator_for(spec: Aggregation, proximal_mu: float) -> Aggregator:
    """The aggregator a study's `aggregation` block (and `training.proximal_mu`) asks for.

    Each class gets only the knobs it takes: FedAvg ignores β1, β2 and τ, which the study
    schema always carries with defaults. The robust knobs (trim, byzantine, multi, clip_radius,
    iterations) are None unless the study sets them, which takes the aggregator's default.
    """
    offered: dict[str, float | None] = {
        "server_lr": spec.server_lr,
        "beta1": spec.beta1,
        "beta2": spec.beta2,
        "tau": spec.tau,
        "proximal_mu": proximal_mu,
        "trim": spec.trim,
        "byzantine": spec.byzantine,
        "multi": spec.multi,
        "clip_radius": spec.clip_radius,
        "iterations": spec.iterations,
    }
    cls = AGGREGATORS.get(spec.name)
    accepted = knob_names(cls) if cls is not None else ()
    return make_aggregator(
        spec.name, **{k: v for k, v in offered.items() if k in accepted and v is not None}
    )


def knob_names(cls: type[Aggregator]) -> tuple[str, ...]:
    """The keyword-only constructor knobs of an aggregator class, in declaration order."""
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
