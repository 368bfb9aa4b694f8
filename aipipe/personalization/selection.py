"""Local refinement with its length chosen on validation: the helper that `finetune`, `fenda`
and `ditto` share.

From the weights loaded in `model`, the refinement runs up to `training.local_steps` non-DP
steps on the fit split and looks at the validation loss (mean BCE) at a few checkpoints: 0,
steps/4, steps/2, 3·steps/4 and steps. The checkpoint with the lowest loss wins (the earliest on
a tie), so 0 steps, the starting weights as they are, is always a candidate and refinement that
only hurts validation is not kept. The test split is never given, so nothing is chosen on it.

One run of `steps` steps looks at each checkpoint as it passes (`train_local`'s `after_step`),
so the refinement costs `steps` steps and five validation losses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aipipe.models.serialization import Arrays, arrays_to_model, weights_to_arrays
from aipipe.models.training import evaluate, train_local
from aipipe.personalization.base import NO_DP, PersonalModel, SiteData
from aipipe.study.blocks import Training

CHECKPOINTS = 4
"""The refinement is looked at after every quarter of its steps (and before the first)."""


def checkpoints(steps: int, count: int = CHECKPOINTS) -> list[int]:
    """The step counts tried: 0, steps/count, …, steps (rounded down, without repeats)."""
    if steps < 0:
        raise ValueError(f"a refinement takes zero or more steps, got {steps}")
    return sorted({steps * i // count for i in range(count + 1)})


def refine_on_validation(
    model: nn.Module,
    data: SiteData,
    training: Training,
    *,
    seed: int,
    anchor: Mapping[str, np.ndarray] | None = None,
    mu: float = 0.0,
) -> PersonalModel:
    """Refine `model` from the weights loaded in it for up to `training.local_steps` non-DP
    steps (plus μ/2‖w − anchor‖² when μ > 0), choose the checkpoint with the lowest validation
    loss, load it into `model` and return it with `chosen={"steps": k}`.

    Only trainable parameters move (freeze a part with `frozen`); the study's `proximal_mu`
    does not apply: `mu` is the only proximal term.
    """
    x_val, y_val = _tensors(data)
    wanted = set(checkpoints(training.local_steps))
    best: tuple[Arrays, float, int] = (weights_to_arrays(model), _loss(model, x_val, y_val), 0)

    def look(step: int) -> None:
        nonlocal best
        if step in wanted:
            loss = _loss(model, x_val, y_val)
            if loss < best[1]:
                best = (weights_to_arrays(model), loss, step)
            model.train()

    if training.local_steps > 0:
        train_local(
            model,
            data.x_fit,
            data.y_fit,
            training=training,
            privacy=NO_DP,
            noise_multiplier=None,
            global_weights=anchor,
            proximal_mu=mu,
            seed=seed,
            after_step=look,
        )
    weights, _, k = best
    arrays_to_model(weights, model)
    validation = evaluate(model, data.x_val, data.y_val)  # AUC and accuracy: the chosen one only
    return PersonalModel(weights=weights, validation=validation, chosen={"steps": float(k)})


def _tensors(data: SiteData) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data.y_val) == 0:
        raise ValueError("the validation split is empty: nothing to choose a checkpoint on")
    x = torch.from_numpy(np.ascontiguousarray(data.x_val, dtype=np.float32))
    return x, torch.from_numpy(np.ascontiguousarray(data.y_val, dtype=np.float32))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean validation BCE, as `evaluate` computes it (without its AUC, which costs more)."""
    model.eval()
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).item()


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Hold `module`'s parameters fixed (no gradient, left out of the optimizer) inside the
    block; their `requires_grad` flags are restored after it."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
