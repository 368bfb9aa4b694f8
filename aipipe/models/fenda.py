"""FENDA-FL's architecture (Tavakoli et al. 2023, arXiv:2309.16825): two feature extractors side
by side, their features concatenated into one head,

    head(cat(global_extractor(x), local_extractor(x)))

The global extractor is federated; the local extractor and the head stay on the site
(`aipipe.personalization.fenda`). Both extractors are Linear/ReLU stacks and the head is one
`Linear(·, 1)` logit, so the model has only `Linear`, `ReLU` and `Identity` leaves, each Linear
run once per forward on rows that do not mix: `aipipe.privacy.clipping`'s exact per-sample norms
hold for it as for `SplitModel` (each layer's per-sample gradient is still an outer product of
its input and its output's gradient; the branches only add their squared norms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FendaModel(nn.Module):
    """`head(cat(global_extractor(x), local_extractor(x)))` with a one-logit linear head."""

    def __init__(
        self, global_extractor: nn.Module, local_extractor: nn.Module, head: nn.Linear
    ) -> None:
        super().__init__()
        if head.out_features != 1:
            raise ValueError(f"the head must output one logit, not {head.out_features}")
        self.global_extractor = global_extractor
        self.local_extractor = local_extractor
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.global_extractor(x), self.local_extractor(x)], dim=1)
        out: torch.Tensor = self.head(features)
        return out


def build_fenda(
    n_features: int,
    global_hidden: Sequence[int],
    local_hidden: Sequence[int],
    *,
    seed: int | None = None,
) -> FendaModel:
    """A `FendaModel` for `n_features` inputs with extractors of the given hidden widths.

    `seed` makes the initial weights reproducible without touching the global torch RNG.
    """
    if n_features < 1:
        raise ValueError(f"a model needs at least one feature, got {n_features}")
    if not global_hidden or not local_hidden:
        raise ValueError("both FENDA feature extractors need at least one hidden layer")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        global_extractor = _extractor(n_features, global_hidden)
        local_extractor = _extractor(n_features, local_hidden)
        head = nn.Linear(global_hidden[-1] + local_hidden[-1], 1)
    return FendaModel(global_extractor, local_extractor, head)


def _extractor(n_features: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden:
        if size < 1:
            raise ValueError(f"a hidden layer needs at least one unit, got {size}")
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers)
