"""A node's local training for one round, private or not, and local evaluation.

`train_local` runs `training.local_steps` optimizer steps and returns the new weights, the update
Δ = new − start that the node sends (after clipping, compression and encryption elsewhere), and
what the audit log and the budget ledger need. With `privacy.mode == "dp"` each step is DP-SGD
(`aipipe.privacy.DPSGD`): Poisson batches at q = batch/n, exact per-sample clipping to
`privacy.clip`, Gaussian noise σ·clip. The ε of the round is reported; the caller charges the
`BudgetLedger` with (σ, q, steps) before the update leaves the node (best before training: all
three are known in advance, from the `PrivacyEngine`'s plan).

The reported `loss` is the mean training loss of the rows seen; it is computed on private rows
and NOT covered by ε, so it stays on the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from aipipe.models.serialization import Arrays, weights_to_arrays
from aipipe.privacy.engine import Plan, PrivacyEngine
from aipipe.study.blocks import Privacy, Training


@dataclass(frozen=True)
class TrainResult:
    """One local round: the new weights, the update Δ = new − start, and what ledger and audit need.

    `epsilon_round` is ε of this round's steps alone (None without DP); the study's cumulative ε
    is the `BudgetLedger`'s to compose. `loss` is the mean training loss of the rows seen.
    """

    weights: Arrays
    delta: Arrays
    num_examples: int
    steps: int
    loss: float
    update_norm: float
    epsilon_round: float | None
    noise_multiplier: float | None
    sample_rate: float | None


@dataclass(frozen=True)
class EvalResult:
    n: int
    accuracy: float
    auc: float | None
    loss: float


@dataclass(frozen=True)
class _Round:
    """What every local step needs, gathered once per round."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    features: torch.Tensor
    labels: torch.Tensor
    training: Training
    mu: float
    anchor: Mapping[str, torch.Tensor]
    generator: torch.Generator
    after_step: Callable[[int], None] | None = None


def train_local(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    training: Training,
    privacy: Privacy,
    noise_multiplier: float | None,
    global_weights: Mapping[str, np.ndarray] | None = None,
    proximal_mu: float | None = None,
    seed: int,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` in place for one round on (X, y) and describe the update.

    `noise_multiplier=None` under DP calibrates σ so that the whole planned study
    (`training.rounds × training.local_steps` steps) stays within `privacy.epsilon`.
    `proximal_mu=None` takes `training.proximal_mu`; μ > 0 adds FedProx' μ/2‖w − w_g‖² (Li et
    al. 2020) anchored at `global_weights`, or at the starting weights when none are given.
    Results are deterministic given `seed`. `after_step(k)` is called after the k-th step of
    training without DP (personal refinement looks at its checkpoints that way, in one run).
    """
    features, labels = _tensors(X, y)
    start = weights_to_arrays(model)
    mu = training.proximal_mu if proximal_mu is None else proximal_mu
    reference = start if global_weights is None else global_weights
    model.train()
    run = _Round(
        model=model,
        optimizer=_optimizer(model, training),
        features=features,
        labels=labels,
        training=training,
        mu=mu,
        anchor=_anchor(model, reference) if mu > 0 else {},
        generator=torch.Generator().manual_seed(seed),
        after_step=after_step,
    )
    sigma = q = epsilon = None
    if privacy.mode == "none":
        if noise_multiplier is not None:
            raise ValueError("a noise multiplier was given but privacy.mode is 'none'")
        loss = _train_plain(run)
    else:
        if after_step is not None:
            raise ValueError("after_step is for training without DP: a DP step is one release")
        plan = PrivacyEngine.plan_local(training, privacy, len(labels), noise_multiplier)
        loss = _train_private(run, plan, privacy.clip)
        sigma, q, epsilon = plan.noise_multiplier, plan.sample_rate, plan.epsilon
    new = weights_to_arrays(model)
    delta = {name: new[name] - start[name] for name in new}
    return TrainResult(
        weights=new,
        delta=delta,
        num_examples=len(labels),
        steps=training.local_steps,
        loss=loss,
        update_norm=math.sqrt(sum(float(np.square(d).sum()) for d in delta.values())),
        epsilon_round=epsilon,
        noise_multiplier=sigma,
        sample_rate=q,
    )


def clip_update(result: TrainResult, max_norm: float) -> TrainResult:
    """Δ projected onto the L2 ball of radius `max_norm` (the study's `bounds.update_norm`),
    the hub's bound on any update. Post-processing of a DP update: ε is unchanged. Scaled a
    hair inside the ball so that float32 rounding never lands it outside."""
    if result.update_norm <= max_norm:
        return result
    scale = max_norm * (1 - 1e-6) / result.update_norm
    delta = {k: (v * scale).astype(v.dtype) for k, v in result.delta.items()}
    start = {k: result.weights[k] - result.delta[k] for k in result.weights}
    norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values()))
    weights = {k: (start[k] + delta[k]).astype(result.weights[k].dtype) for k in start}
    return replace(result, weights=weights, delta=delta, update_norm=norm)


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> EvalResult:
    """Accuracy at threshold 0.5, ROC AUC (None when y holds one class only) and mean BCE."""
    features, labels = _tensors(X, y)
    model.eval()
    with torch.no_grad():
        logits = model(features).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, labels).item()
    accuracy = ((logits > 0).float() == labels).float().mean().item()
    both_classes = bool(labels.min() != labels.max())
    auc = float(roc_auc_score(labels.numpy(), logits.numpy())) if both_classes else None
    return EvalResult(n=len(labels), accuracy=accuracy, auc=auc, loss=loss)


def proximal_gradient(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> None:
    """Add ∇(μ/2‖w − w_g‖²) = μ(w − w_g) to each trainable parameter's gradient."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad.add_(param - anchor[name], alpha=mu)


def _train_plain(run: _Round) -> float:
    n, batch = len(run.labels), min(run.training.batch_size, len(run.labels))
    order = torch.randperm(n, generator=run.generator)
    cursor, total, seen = 0, 0.0, 0
    for step in range(run.training.local_steps):
        if cursor + batch > n:  # a fresh shuffle per epoch: sampling without replacement
            order, cursor = torch.randperm(n, generator=run.generator), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        run.optimizer.zero_grad(set_to_none=True)
        logits = run.model(run.features[idx]).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, run.labels[idx])
        torch.autograd.backward(loss)
        if run.mu > 0:
            proximal_gradient(run.model, run.anchor, run.mu)
        run.optimizer.step()
        total, seen = total + loss.item() * len(idx), seen + len(idx)
        if run.after_step is not None:
            run.after_step(step + 1)
    return total / seen


def _train_private(run: _Round, plan: Plan, clip: float) -> float:
    dp = PrivacyEngine.make_private(
        run.model,
        run.optimizer,
        plan,
        max_grad_norm=clip,
        num_examples=len(run.labels),
        generator=run.generator,
    )

    def proximal() -> None:
        proximal_gradient(run.model, run.anchor, run.mu)

    total, seen = 0.0, 0
    for _ in range(run.training.local_steps):
        idx = dp.sample()
        target = run.labels[idx]

        def per_sample_loss(logits: torch.Tensor, target: torch.Tensor = target) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits.squeeze(1), target, reduction="none")

        losses = dp.step(
            run.features[idx], per_sample_loss, public_term=proximal if run.mu > 0 else None
        )
        total, seen = total + float(losses.sum()), seen + len(idx)
    return total / seen if seen else math.nan


def _optimizer(model: nn.Module, training: Training) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr)
    return torch.optim.SGD(params, lr=training.lr)


def _anchor(model: nn.Module, weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"global weights lack parameters: {', '.join(missing)}")
    return {name: torch.as_tensor(np.asarray(weights[name], dtype=np.float32)) for name in names}


def _tensors(X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"need X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
    if X.shape[0] == 0:
        raise ValueError("need at least one example")
    if not np.isfinite(X).all():
        raise ValueError("features hold NaN or infinite values; choose a missing-value policy")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return features, torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
