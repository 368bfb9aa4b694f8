"""The study models, split into a shared `body` and a `head` for FedPer personalization.

FedPer (Arivazhagan et al. 2019, arXiv:1912.00818) federates the body and keeps a local head, so
every model is `head(body(x))` with the head a single `Linear(·, 1)` that outputs a logit (train
with `BCEWithLogitsLoss`, which is numerically stabler than a sigmoid followed by BCE). Logistic
regression is the degenerate split: an identity body and a linear head.

Only `Linear`, `ReLU` and `Identity` are used on purpose: `aipipe.privacy.clipping` computes exact
per-sample gradient norms for exactly these layers in one backward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from aipipe.errors import StudyError
from aipipe.study.blocks import ModelSpec


class SplitModel(nn.Module):
    """`head(body(x))`: a body whose weights are federated and a one-logit linear head."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        if head.out_features != 1:
            raise ValueError(f"the head must output one logit, not {head.out_features}")
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


def build_model(spec: ModelSpec, n_features: int, *, seed: int | None = None) -> SplitModel:
    """Build the model a study names for `n_features` inputs.

    `seed` makes the initial weights reproducible without touching the global torch RNG, so the
    hub can create version 0 of a model deterministically.
    """
    if n_features < 1:
        raise ValueError(f"a model needs at least one feature, got {n_features}")
    if spec.kind == "logistic" and spec.hidden:
        raise StudyError("model kind 'logistic' takes no hidden layers; use kind: mlp")
    if spec.kind == "mlp" and not spec.hidden:
        raise StudyError("model kind 'mlp' needs at least one hidden layer; use kind: logistic")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return _build(spec, n_features)


def _build(spec: ModelSpec, n_features: int) -> SplitModel:
    if spec.kind == "logistic":
        return SplitModel(nn.Identity(), nn.Linear(n_features, 1))
    layers: list[nn.Module] = []
    width = n_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return SplitModel(nn.Sequential(*layers), nn.Linear(width, 1))
