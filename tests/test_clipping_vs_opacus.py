"""aipipe's one-pass clipped gradient sum equals the one Opacus builds from its own per-sample
gradients (GradSampleModule, default hooks), for the models studies use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from aipipe.models import build_model
from aipipe.privacy.clipping import PerSampleClipper
from aipipe.study.blocks import ModelSpec


def _opacus_clipped_sum(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> dict[str, torch.Tensor]:
    wrapped = GradSampleModule(model, loss_reduction="sum")
    loss = F.binary_cross_entropy_with_logits(wrapped(x).squeeze(1), y, reduction="sum")
    loss.backward()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    per_sample = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params])
    norms = per_sample.norm(dim=0)
    # Opacus' DPOptimizer clip factor: C / (‖g_i‖ + 1e-6), capped at 1.
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    out = {
        name: torch.einsum("i,i...->...", factors, p.grad_sample)
        for name, p in wrapped.named_parameters()
    }
    wrapped._close()
    return {name.removeprefix("_module."): value for name, value in out.items()}


@pytest.mark.parametrize(
    "spec", [ModelSpec(kind="logistic"), ModelSpec(kind="mlp", hidden=[16, 8])]
)
@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_clipped_sum_equals_opacus_per_sample_clipping(spec: ModelSpec, clip: float) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 13), torch.randint(0, 2, (32,)).float()
    reference_model = build_model(spec, 13, seed=1)
    ours = build_model(spec, 13, seed=1)
    expected = _opacus_clipped_sum(reference_model, x, y, clip)

    PerSampleClipper(ours, clip).clipped_backward(
        x, lambda out: F.binary_cross_entropy_with_logits(out.squeeze(1), y, reduction="none")
    )

    for name, param in ours.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6)
