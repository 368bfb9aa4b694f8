"""FedProx: FedAvg on the hub, a proximal term on the nodes.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys), Algorithm 2: each node
minimises h_k(w; w^t) = F_k(w) + (μ/2)·‖w − w^t‖², which keeps local training near the global
model w^t when sites' data differ; the server then averages as FedAvg does. So `FedProx` differs
from `FedAvg` only in carrying `proximal_mu` for the nodes, and `proximal_term` is what a node's
training loop adds to its loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from aipipe.aggregation.base import AggregationError
from aipipe.aggregation.fedavg import FedAvg

if TYPE_CHECKING:
    from torch import Tensor


class FedProx(FedAvg):
    """FedAvg's server rule plus the node-side proximal weight μ (Li et al. 2020)."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, server_lr: float = 1.0, proximal_mu: float = 0.01) -> None:
        super().__init__(server_lr=server_lr)
        if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, int | float):
            raise AggregationError(f"proximal_mu must be a number, got {proximal_mu!r}")
        if not math.isfinite(proximal_mu) or proximal_mu < 0:
            raise AggregationError(f"proximal_mu must be finite and ≥ 0, got {proximal_mu}")
        self.proximal_mu = float(proximal_mu)

    def __repr__(self) -> str:
        return f"FedProx(server_lr={self.server_lr}, proximal_mu={self.proximal_mu})"


def proximal_term(
    local_params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float
) -> Tensor:
    """(μ/2)·‖w − w^t‖² summed over all parameters; its gradient in w is μ·(w − w^t).

    The global parameters are detached: they are the fixed anchor of the round, not trained.
    This is the squared norm of Li et al. 2020, eq. (2); Flower's FedProx docstring example adds
    unsquared norms, which has a different gradient (a unit vector, not μ·(w − w^t)).
    """
    if not math.isfinite(mu) or mu < 0:
        raise AggregationError(f"proximal mu must be finite and ≥ 0, got {mu}")
    local, anchors = list(local_params), list(global_params)
    if not local or len(local) != len(anchors):
        raise AggregationError(
            f"proximal_term got {len(local)} local and {len(anchors)} global parameters; "
            "pass the same model's parameters in the same order"
        )
    squares = [
        _squared_distance(index, w, a)
        for index, (w, a) in enumerate(zip(local, anchors, strict=True))
    ]
    total = squares[0]
    for square in squares[1:]:
        total = total + square
    return total * (0.5 * mu)


def _squared_distance(index: int, local: Tensor, anchor: Tensor) -> Tensor:
    if local.shape != anchor.shape:
        raise AggregationError(
            f"parameter {index} has shape {tuple(local.shape)} locally but "
            f"{tuple(anchor.shape)} in the global model"
        )
    return (local - anchor.detach()).pow(2).sum()
