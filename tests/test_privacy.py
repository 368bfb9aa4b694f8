"""Privacy maths (ε, σ calibration), exact per-sample clipping, DP-SGD sampling, budget ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_utils import Database
from torch import nn

from aipipe.errors import AipipeError
from aipipe.models import build_model
from aipipe.privacy import (
    DPSGD,
    BudgetExhaustedError,
    BudgetLedger,
    BudgetNotSetError,
    NoiseCalibrationError,
    PerSampleClipper,
    RoundAlreadyChargedError,
    UnsupportedModuleError,
    calibrate_noise,
    compose_epsilon,
    epsilon_for,
    sample_rate,
)
from aipipe.study.blocks import ModelSpec

# Golden values, computed once with Opacus 1.6 (the accountants below are Opacus'):
#   .venv/bin/python -c "from opacus.accountants import RDPAccountant as A; a = A();
#       a.history = [(1.0, 0.01, 1000)]; print(a.get_epsilon(delta=1e-5))"
# gives 2.1013652716430564; PRVAccountant in the same command gives 1.838371637017295.
GOLDEN_RDP = 2.1013652716430564
GOLDEN_PRV = 1.838371637017295


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --- accountant ---------------------------------------------------------------------------------


def test_rdp_epsilon_matches_the_opacus_golden_value() -> None:
    assert epsilon_for(1.0, 0.01, 1000, 1e-5, "rdp") == pytest.approx(GOLDEN_RDP, abs=1e-3)


def test_prv_epsilon_matches_the_opacus_golden_value_and_is_tighter_than_rdp() -> None:
    prv = epsilon_for(1.0, 0.01, 1000, 1e-5, "prv")

    assert prv == pytest.approx(GOLDEN_PRV, abs=1e-3)
    assert prv < GOLDEN_RDP


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_keeps_the_planned_study_within_and_near_the_target(
    accountant: str,
) -> None:
    sigma = calibrate_noise(1.0, 1e-5, 0.01, 1500, accountant)  # type: ignore[arg-type]

    epsilon = epsilon_for(sigma, 0.01, 1500, 1e-5, accountant)  # type: ignore[arg-type]
    assert 0.97 <= epsilon <= 1.0


def test_a_target_no_noise_can_reach_is_a_calibration_error() -> None:
    with pytest.raises(NoiseCalibrationError, match="raise ε"):
        calibrate_noise(1e-6, 1e-5, 1.0, 10_000, "rdp")


@settings(max_examples=15, deadline=None)
@given(
    steps=st.integers(min_value=1, max_value=2000),
    extra=st.integers(min_value=1, max_value=2000),
    sigma=st.floats(min_value=0.5, max_value=5.0),
    q=st.floats(min_value=1e-3, max_value=0.2),
)
def test_epsilon_grows_with_steps(steps: int, extra: int, sigma: float, q: float) -> None:
    fewer = epsilon_for(sigma, q, steps, 1e-5, "rdp")
    more = epsilon_for(sigma, q, steps + extra, 1e-5, "rdp")

    assert more >= fewer


def test_composing_rounds_equals_one_run_and_beats_summing_per_round_epsilon() -> None:
    rounds = [(1.0, 0.01, 100)] * 10

    composed = compose_epsilon(rounds, 1e-5, "rdp")

    assert composed == epsilon_for(1.0, 0.01, 1000, 1e-5, "rdp")
    assert composed < 10 * epsilon_for(1.0, 0.01, 100, 1e-5, "rdp") / 2


def test_no_steps_cost_nothing_and_no_noise_costs_everything() -> None:
    assert epsilon_for(1.0, 0.01, 0, 1e-5, "prv") == 0.0
    assert epsilon_for(0.0, 0.01, 10, 1e-5, "prv") == float("inf")


def test_sample_rate_is_batch_over_n_capped_at_one() -> None:
    assert sample_rate(4, 400) == 0.01
    assert sample_rate(500, 400) == 1.0


# --- exact per-sample clipping ------------------------------------------------------------------


def _bce(y: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda logits: F.binary_cross_entropy_with_logits(logits.squeeze(1), y, reduction="none")


def _reference_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):  # type: ignore[no-untyped-def]
    """Σ_i clip(∇ℓ_i) by one autograd call per example: slow, obviously right."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = F.binary_cross_entropy_with_logits(model(x[i : i + 1]).squeeze(1), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return total


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_clipped_sum_equals_per_example_clipping_for_an_mlp(clip: float) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(kind="mlp", hidden=[16, 8]), 5, seed=0)
    x, y = torch.randn(12, 5) * 3, torch.randint(0, 2, (12,)).float()
    expected = _reference_clipped_sum(model, x, y, clip)

    PerSampleClipper(model, clip).clipped_backward(x, _bce(y))

    for param, want in zip(model.parameters(), expected, strict=True):
        assert param.grad is not None
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-6)


def test_each_example_contributes_at_most_the_clip_norm() -> None:
    model = build_model(ModelSpec(kind="logistic"), 3, seed=0)
    nn.init.zeros_(model.head.weight)  # logit 0: the gradient is 0.5·x, far above the clip
    x, y = torch.full((1, 3), 100.0), torch.zeros(1)

    _, norms = PerSampleClipper(model, 0.5).clipped_backward(x, _bce(y))

    total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))  # type: ignore[union-attr]
    assert float(norms[0]) > 10  # the raw gradient is large …
    assert float(total) == pytest.approx(0.5, rel=1e-5)  # … and what is summed is clipped


def test_an_empty_batch_yields_zero_gradients() -> None:
    model = build_model(ModelSpec(kind="mlp", hidden=[4]), 3, seed=0)

    PerSampleClipper(model, 1.0).clipped_backward(torch.zeros(0, 3), _bce(torch.zeros(0)))

    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_layers_without_exact_norms_are_refused_by_name() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    with pytest.raises(UnsupportedModuleError, match=r"'1' \(BatchNorm1d\)"):
        PerSampleClipper(model, 1.0)


def test_a_layer_applied_twice_is_refused() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))[:, :1]

    with pytest.raises(UnsupportedModuleError, match="exactly once"):
        PerSampleClipper(Tied(), 1.0).clipped_backward(torch.ones(2, 3), _bce(torch.ones(2)))


def test_a_noiseless_step_descends_the_clipped_sum_over_the_expected_batch_size() -> None:
    model = build_model(ModelSpec(kind="mlp", hidden=[4]), 3, seed=0)
    x, y = torch.randn(10, 3) * 5, torch.randint(0, 2, (10,)).float()
    clipped_sum = _reference_clipped_sum(model, x, y, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        sample_rate=0.5,
        num_examples=20,  # expected batch q·n = 10
        generator=torch.Generator().manual_seed(0),
    )

    dp.step(x, _bce(y))

    for old, new, g in zip(before, model.parameters(), clipped_sum, strict=True):
        torch.testing.assert_close(new.detach(), old - g / 10, rtol=1e-4, atol=1e-6)


def test_poisson_batches_have_expected_size_q_times_n() -> None:
    model = build_model(ModelSpec(kind="logistic"), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSGD(
        model,
        optimizer,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.05,
        num_examples=1000,
        generator=torch.Generator().manual_seed(0),
    )

    sizes = [len(dp.sample()) for _ in range(200)]

    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # Poisson: the size varies, unlike a fixed-size batch


# --- budget ledger ------------------------------------------------------------------------------

STEP = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "accountant": "rdp"}


@pytest.fixture
def ledger(tmp_path: Path) -> BudgetLedger:
    ledger = BudgetLedger(Database(tmp_path / "node.db"))
    ledger.set_budget("chd", epsilon=2.0, delta=1e-5)
    return ledger


def test_spent_composes_all_recorded_steps_instead_of_summing_rounds(ledger: BudgetLedger) -> None:
    for round_ in range(1, 4):
        ledger.charge("chd", round_, **STEP)  # type: ignore[arg-type]

    assert ledger.spent("chd") == pytest.approx(epsilon_for(1.0, 0.01, 300, 1e-5, "rdp"))
    assert ledger.spent("chd") < 3 * epsilon_for(1.0, 0.01, 100, 1e-5, "rdp")
    assert [e.epsilon for e in ledger.entries("chd")] == sorted(
        e.epsilon for e in ledger.entries("chd")
    )


def test_a_round_past_the_budget_is_refused_with_its_numbers(ledger: BudgetLedger) -> None:
    ledger.set_budget("chd", epsilon=1.5, delta=1e-5)
    ledger.charge("chd", 1, **STEP)  # type: ignore[arg-type]
    spent = ledger.spent("chd")

    with pytest.raises(BudgetExhaustedError) as refused:
        ledger.charge(
            "chd", 2, noise_multiplier=0.5, sample_rate=0.01, steps=1000, accountant="rdp"
        )

    err = refused.value
    assert isinstance(err, AipipeError)
    assert (err.study, err.round, err.budget) == ("chd", 2, 1.5)
    assert err.spent == pytest.approx(spent)
    assert err.needed > err.remaining
    assert str(err) == (
        f"round 2 needs ε={err.needed:.2f} but {1.5 - spent:.2f} of 1.50 is left for study "
        "'chd'; lower rounds or raise the site budget"
    )
    assert [e.round for e in ledger.entries("chd")] == [1]


def test_a_calibrated_study_fits_its_budget_exactly_and_one_more_round_does_not(
    ledger: BudgetLedger,
) -> None:
    sigma = calibrate_noise(2.0, 1e-5, 0.01, 5 * 100, "rdp")
    step = {"noise_multiplier": sigma, "sample_rate": 0.01, "steps": 100, "accountant": "rdp"}
    for round_ in range(1, 6):
        ledger.charge("chd", round_, **step)  # type: ignore[arg-type]

    with pytest.raises(BudgetExhaustedError):
        ledger.charge("chd", 6, **step)  # type: ignore[arg-type]
    assert ledger.remaining("chd") < 0.02 * 2.0


def test_charging_the_same_round_twice_pays_once(ledger: BudgetLedger) -> None:
    first = ledger.charge("chd", 1, **STEP)  # type: ignore[arg-type]
    again = ledger.charge("chd", 1, **STEP)  # type: ignore[arg-type]

    assert again == first
    assert ledger.spent("chd") == pytest.approx(first.epsilon)
    assert len(ledger.entries("chd")) == 1


def test_a_resumed_round_with_other_settings_is_refused(ledger: BudgetLedger) -> None:
    ledger.charge("chd", 1, **STEP)  # type: ignore[arg-type]

    with pytest.raises(RoundAlreadyChargedError, match="round 1 of study 'chd'"):
        ledger.charge("chd", 1, noise_multiplier=0.8, sample_rate=0.01, steps=100, accountant="rdp")


def test_charging_a_study_without_a_budget_is_refused(ledger: BudgetLedger) -> None:
    with pytest.raises(BudgetNotSetError, match="'other'"):
        ledger.charge("other", 1, **STEP)  # type: ignore[arg-type]


def test_charges_persist_and_status_reports_every_study(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    first = BudgetLedger(Database(path))
    first.set_budget("chd", epsilon=2.0, delta=1e-5)
    first.set_budget("brca", epsilon=1.0, delta=1e-6)
    entry = first.charge("chd", 1, **STEP)  # type: ignore[arg-type]
    first.db.close()

    status = BudgetLedger(Database(path)).status()

    assert [s.study for s in status] == ["brca", "chd"]
    assert (status[0].spent, status[0].remaining, status[0].rounds) == (0.0, 1.0, 0)
    assert status[1].spent == pytest.approx(entry.epsilon)
    assert status[1].remaining == pytest.approx(2.0 - entry.epsilon)
    assert status[1].rounds == 1
