"""DP-SGD for one node's local steps: the single facade over sampling, clipping and noise.

Each step (Abadi et al. 2016) draws a Poisson batch (every row joins with probability q, the
sampling the RDP and PRV analyses assume; fixed-size shuffled batches would void them), sums the
per-sample gradients clipped to norm C (`aipipe.privacy.clipping`), and hands the sum to Opacus'
`DPOptimizerFastGradientClipping`, which adds N(0, σ²C²) noise and divides by the expected batch
size q·n before the wrapped optimizer (Adam or SGD; both are post-processing) steps.

Batches are sliced from tensors built once, not drawn through a per-item DataLoader: that is
cheaper per step and draws the same Poisson mask as Opacus' `UniformWithReplacementSampler`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from aipipe.privacy.clipping import PerSampleClipper

GradientTerm = Callable[[], None]


class DPSGD:
    """Runs DP-SGD steps of `optimizer` over `model` on the rows of pre-built tensors."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        num_examples: int,
        generator: torch.Generator,
    ) -> None:
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        if noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be non-negative, got {noise_multiplier}")
        self.clipper = PerSampleClipper(model, max_grad_norm)
        self.sample_rate = sample_rate
        self.num_examples = num_examples
        self.generator = generator
        # Dividing by the EXPECTED batch size q·n, not the drawn one, keeps the sensitivity of the
        # averaged gradient at C/(q·n) whatever the batch drawn (Opacus does the same).
        self.optimizer = DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1, round(sample_rate * num_examples)),
            loss_reduction="mean",
            generator=generator,
        )

    def sample(self) -> torch.Tensor:
        """Indices of one Poisson batch (possibly empty: the step still adds noise)."""
        mask = torch.rand(self.num_examples, generator=self.generator) < self.sample_rate
        return mask.nonzero().squeeze(1)

    def step(
        self,
        x: torch.Tensor,
        per_sample_loss: Callable[[torch.Tensor], torch.Tensor],
        *,
        public_term: GradientTerm | None = None,
    ) -> torch.Tensor:
        """One private step on the batch `x`; returns the per-sample losses.

        `public_term` adds a data-independent gradient (the FedProx proximal term) AFTER the
        noise: it reads no private row, so it is post-processing and costs no ε.
        """
        self.optimizer.zero_grad(set_to_none=True)
        losses, _ = self.clipper.clipped_backward(x, per_sample_loss)
        # Hand the clipped sum to Opacus as its `summed_grad` directly: `pre_step` would deep-copy
        # it first (made for accumulating several batches), a third of a small model's step.
        for param in self.optimizer.params:
            param.summed_grad = param.grad
        self.optimizer.add_noise()  # p.grad = summed_grad + N(0, σ²C²)
        self.optimizer.scale_grad()  # ÷ expected batch size q·n
        if public_term is not None:
            public_term()
        self.optimizer.original_optimizer.step()
        return losses
