"""Local training for one round (private and not) and local evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aipipe.models import build_model, weights_to_arrays
from aipipe.models.training import evaluate, train_local
from aipipe.privacy import epsilon_for
from aipipe.study.blocks import ModelSpec, Privacy, Training

LOGISTIC = ModelSpec(kind="logistic")
NO_DP = Privacy(mode="none")
DP = Privacy(mode="dp", clip=1.0, accountant="rdp")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def separable(n: int = 400, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) > 0).astype(np.float32)
    return X, y


def test_non_private_training_separates_separable_data() -> None:
    X, y = separable()
    model = build_model(LOGISTIC, 5, seed=0)

    train_local(
        model,
        X,
        y,
        training=Training(local_steps=200, batch_size=32, lr=0.05),
        privacy=NO_DP,
        noise_multiplier=None,
        seed=1,
    )

    assert evaluate(model, X, y).accuracy >= 0.95


def test_private_training_reduces_the_loss() -> None:
    X, y = separable(n=1000)
    model = build_model(ModelSpec(kind="mlp", hidden=[16]), 5, seed=0)
    before = evaluate(model, X, y).loss

    result = train_local(
        model,
        X,
        y,
        training=Training(local_steps=150, batch_size=100, lr=0.02),
        privacy=DP,
        noise_multiplier=1.0,
        seed=1,
    )

    after = evaluate(model, X, y)
    assert after.loss < 0.7 * before
    assert after.accuracy >= 0.85
    assert result.epsilon_round == pytest.approx(epsilon_for(1.0, 0.1, 150, 1e-5, "rdp"))


def test_per_sample_clipping_bounds_the_update_by_lr_times_clip_per_step() -> None:
    # q = 1 (batch ≥ n) makes every batch the whole set, so with σ = 0 and plain SGD each step
    # moves the weights by lr·‖Σ clip(∇ℓ_i)‖/n ≤ lr·C. Features ×100 make raw gradients huge.
    X, y = separable(n=50)
    X *= 100
    lr, clip, steps = 0.1, 0.01, 20
    training = Training(local_steps=steps, batch_size=50, lr=lr, optimizer="sgd")
    clipped = build_model(LOGISTIC, 5, seed=0)
    unclipped = build_model(LOGISTIC, 5, seed=0)

    with pytest.warns(UserWarning, match="no privacy"):
        result = train_local(
            clipped,
            X,
            y,
            training=training,
            privacy=Privacy(clip=clip),
            noise_multiplier=0.0,
            seed=0,
        )
    raw = train_local(
        unclipped, X, y, training=training, privacy=NO_DP, noise_multiplier=None, seed=0
    )

    assert result.update_norm <= lr * clip * steps * (1 + 1e-5)
    assert raw.update_norm > 100 * lr * clip * steps  # without clipping the bound is far exceeded


def test_training_is_deterministic_given_the_seed() -> None:
    X, y = separable()
    training = Training(local_steps=30, batch_size=16, lr=0.05)

    def run(seed: int) -> dict[str, np.ndarray]:
        model = build_model(ModelSpec(kind="mlp", hidden=[8]), 5, seed=0)
        return train_local(
            model, X, y, training=training, privacy=DP, noise_multiplier=1.0, seed=seed
        ).weights

    first, second, other = run(3), run(3), run(4)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_the_update_is_new_weights_minus_start_and_its_norm_is_reported() -> None:
    X, y = separable()
    model = build_model(LOGISTIC, 5, seed=0)
    start = weights_to_arrays(model)

    result = train_local(
        model,
        X,
        y,
        training=Training(local_steps=10, batch_size=16, lr=0.05),
        privacy=NO_DP,
        noise_multiplier=None,
        seed=0,
    )

    for name in start:
        np.testing.assert_allclose(result.delta[name], result.weights[name] - start[name])
    flat = np.concatenate([d.ravel() for d in result.delta.values()])
    assert result.update_norm == pytest.approx(float(np.linalg.norm(flat)), rel=1e-5)
    assert (result.num_examples, result.steps, result.epsilon_round) == (400, 10, None)


def test_a_proximal_term_keeps_the_update_near_the_global_weights() -> None:
    X, y = separable()
    training = Training(local_steps=50, batch_size=32, lr=0.05, optimizer="sgd")

    def norm(mu: float) -> float:
        model = build_model(LOGISTIC, 5, seed=0)
        start = weights_to_arrays(model)
        return train_local(
            model,
            X,
            y,
            training=training,
            privacy=NO_DP,
            noise_multiplier=None,
            global_weights=start,
            proximal_mu=mu,
            seed=0,
        ).update_norm

    assert norm(10.0) < 0.5 * norm(0.0)


def test_without_a_noise_multiplier_the_whole_planned_study_is_calibrated() -> None:
    X, y = separable(n=200)
    training = Training(rounds=4, local_steps=25, batch_size=20, lr=0.05)
    privacy = Privacy(epsilon=2.0, accountant="rdp")

    result = train_local(
        build_model(LOGISTIC, 5, seed=0),
        X,
        y,
        training=training,
        privacy=privacy,
        noise_multiplier=None,
        seed=0,
    )

    assert result.noise_multiplier is not None and result.sample_rate == 0.1
    study_epsilon = epsilon_for(result.noise_multiplier, 0.1, 4 * 25, 1e-5, "rdp")
    assert 0.97 * 2.0 <= study_epsilon <= 2.0


def test_a_noise_multiplier_without_dp_is_refused() -> None:
    X, y = separable()

    with pytest.raises(ValueError, match=r"privacy\.mode is 'none'"):
        train_local(
            build_model(LOGISTIC, 5),
            X,
            y,
            training=Training(),
            privacy=NO_DP,
            noise_multiplier=1.0,
            seed=0,
        )


def test_evaluate_reports_accuracy_auc_and_loss_of_a_known_model() -> None:
    model = build_model(LOGISTIC, 1)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(0.0)
    X = np.array([[-2.0], [-1.0], [1.0], [2.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1], dtype=np.float32)

    result = evaluate(model, X, y)

    expected_loss = nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([-2.0, -1.0, 1.0, 2.0]), torch.tensor(y)
    ).item()
    assert (result.n, result.accuracy, result.auc) == (4, 0.75, 1.0)
    assert result.loss == pytest.approx(expected_loss)


def test_evaluate_has_no_auc_when_only_one_class_is_present() -> None:
    X, _ = separable(n=10)

    result = evaluate(build_model(LOGISTIC, 5), X, np.ones(10, dtype=np.float32))

    assert result.auc is None


def test_after_step_sees_every_step_of_a_run_at_the_weights_of_that_step() -> None:
    X, y = separable()
    training = Training(local_steps=6, batch_size=32, lr=0.1, optimizer="sgd")
    seen: dict[int, dict[str, np.ndarray]] = {}
    model = build_model(LOGISTIC, 5, seed=1)
    train_local(model, X, y, training=training, privacy=NO_DP, noise_multiplier=None, seed=3,
                after_step=lambda k: seen.setdefault(k, weights_to_arrays(model)))  # fmt: skip
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    short = build_model(LOGISTIC, 5, seed=1)
    three = training.model_copy(update={"local_steps": 3})
    train_local(short, X, y, training=three, privacy=NO_DP, noise_multiplier=None, seed=3)
    for name, value in weights_to_arrays(short).items():
        np.testing.assert_array_equal(seen[3][name], value)


def test_after_step_is_refused_under_dp() -> None:
    X, y = separable()
    with pytest.raises(ValueError, match="without DP"):
        train_local(
            build_model(LOGISTIC, 5),
            X,
            y,
            training=Training(local_steps=2),
            privacy=DP,
            noise_multiplier=1.0,
            seed=0,
            after_step=lambda k: None,
        )
