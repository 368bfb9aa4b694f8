"""Server-side aggregation: FedAvg, FedProx, FedAdam, FedYogi, the registry and their state."""

from __future__ import annotations

from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aipipe.aggregation import (
    AGGREGATORS,
    AggregationError,
    Aggregator,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Weights,
    aggregator_for,
    initial_moments,
    make_aggregator,
    proximal_term,
)
from aipipe.errors import AipipeError
from aipipe.study.blocks import Aggregation


def scalar(value: float, dtype: npt.DTypeLike = np.float64) -> npt.NDArray[Any]:
    return np.array([value], dtype=dtype)


def model(w: float, b: float = 0.0) -> Weights:
    return {"w": scalar(w), "b": scalar(b)}


def run_round(
    aggregator: Aggregator, global_weights: Weights, updates: list[tuple[float, int]]
) -> Weights:
    """One round in which node i moves `w` by updates[i][0] and leaves `b` alone."""
    aggregator.begin(global_weights)
    for delta_w, num_examples in updates:
        aggregator.accumulate(model(delta_w, 0.0), num_examples)
    return aggregator.finalize()


# -- FedAvg --------------------------------------------------------------------------------------


def test_fedavg_weights_each_delta_by_its_node_example_count() -> None:
    # (1·4 + 3·0) / (1 + 3) = 1.0, added to w = 10.
    new_global = run_round(FedAvg(), model(10.0, 2.0), [(4.0, 1), (0.0, 3)])

    assert new_global["w"] == pytest.approx([11.0])
    assert new_global["b"] == pytest.approx([2.0])


def test_fedavg_scales_the_mean_delta_by_the_server_learning_rate() -> None:
    new_global = run_round(FedAvg(server_lr=0.5), model(10.0), [(4.0, 1), (0.0, 3)])

    assert new_global["w"] == pytest.approx([10.5])


def test_fedavg_returns_weights_in_the_global_models_dtype() -> None:
    aggregator = FedAvg()
    aggregator.begin({"w": scalar(1.0, np.float32)})
    aggregator.accumulate({"w": scalar(0.25, np.float64)}, 2)

    new_global = aggregator.finalize()

    assert new_global["w"].dtype == np.float32
    assert new_global["w"] == pytest.approx([1.25])


updates_strategy = st.lists(
    st.tuples(
        hnp.arrays(np.float64, (3,), elements=st.floats(-1e3, 1e3, allow_nan=False)),
        st.integers(1, 10_000),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(updates=updates_strategy)
def test_streaming_sum_equals_the_batch_weighted_mean(
    updates: list[tuple[npt.NDArray[Any], int]],
) -> None:
    deltas = np.stack([delta for delta, _ in updates])
    counts = np.array([n for _, n in updates], dtype=np.float64)
    aggregator = FedAvg()
    aggregator.begin({"w": np.zeros(3)})
    for delta, n in updates:
        aggregator.accumulate({"w": delta}, n)

    new_global = aggregator.finalize()

    np.testing.assert_allclose(
        new_global["w"], np.average(deltas, axis=0, weights=counts), rtol=0, atol=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(updates=updates_strategy, data=st.data())
def test_the_order_of_accumulation_does_not_change_the_result(
    updates: list[tuple[npt.NDArray[Any], int]], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(updates))
    results = []
    for ordering in (updates, shuffled):
        aggregator = FedAvg()
        aggregator.begin({"w": np.zeros(3)})
        for delta, n in ordering:
            aggregator.accumulate({"w": delta}, n)
        results.append(aggregator.finalize()["w"])

    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-9)


# -- FedAdam / FedYogi ---------------------------------------------------------------------------


def test_fedopt_moments_start_at_zero_and_tau_squared() -> None:
    m, v = initial_moments({"w": np.ones((2, 2), dtype=np.float32)}, tau=0.1)

    np.testing.assert_array_equal(m["w"], np.zeros((2, 2)))
    np.testing.assert_allclose(v["w"], np.full((2, 2), 0.01))


def test_fedadam_matches_two_steps_of_reddi_algorithm_2_by_hand() -> None:
    # η = 0.5, β1 = 0.5, β2 = 0.5, τ = 1, so m_-1 = 0 and v_-1 = τ² = 1.
    # Round 1: Δ = (1·4 + 3·0)/4 = 1. m = 0.5·0 + 0.5·1 = 0.5; v = 0.5·1 + 0.5·1² = 1;
    #          x = 0 + 0.5·0.5/(√1 + 1) = 0.125.
    # Round 2: Δ = (10 + 4)/2 = 7. m = 0.5·0.5 + 0.5·7 = 3.75; v = 0.5·1 + 0.5·49 = 25;
    #          x = 0.125 + 0.5·3.75/(√25 + 1) = 0.125 + 0.3125 = 0.4375.
    # b never moves: its Δ is 0, so its m stays 0.
    aggregator = FedAdam(server_lr=0.5, beta1=0.5, beta2=0.5, tau=1.0)

    first = run_round(aggregator, model(0.0, 3.0), [(4.0, 1), (0.0, 3)])
    second = run_round(aggregator, first, [(10.0, 1), (4.0, 1)])

    assert first["w"] == pytest.approx([0.125])
    assert second["w"] == pytest.approx([0.4375])
    assert second["b"] == pytest.approx([3.0])


def test_fedyogi_matches_two_steps_of_reddi_algorithm_2_by_hand() -> None:
    # η = 1, β1 = 0.5, β2 = 0.75, τ = 2, so m_-1 = 0 and v_-1 = τ² = 4.
    # Round 1: Δ = (10 + 5)/2 = 7.5, Δ² = 56.25 > v, so v grows:
    #          v = 4 − 0.25·56.25·sign(4 − 56.25) = 4 + 14.0625 = 18.0625 = 4.25²;
    #          m = 0.5·7.5 = 3.75; x = 0 + 3.75/(4.25 + 2) = 0.6.
    # Round 2: Δ = 4, Δ² = 16 < v, so v shrinks (Adam's v would be 0.75·18.0625 + 4 instead):
    #          v = 18.0625 − 0.25·16·sign(18.0625 − 16) = 14.0625 = 3.75²;
    #          m = 0.5·3.75 + 0.5·4 = 3.875; x = 0.6 + 3.875/(3.75 + 2) = 0.6 + 31/46.
    aggregator = FedYogi(server_lr=1.0, beta1=0.5, beta2=0.75, tau=2.0)

    first = run_round(aggregator, model(0.0), [(10.0, 1), (5.0, 1)])
    second = run_round(aggregator, first, [(4.0, 3)])

    assert first["w"] == pytest.approx([0.6])
    assert second["w"] == pytest.approx([0.6 + 31 / 46])
    assert aggregator.get_state()["v/w"] == pytest.approx([14.0625])


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_restored_state_gives_the_same_next_step(cls: type[FedAdam | FedYogi]) -> None:
    original = cls(server_lr=0.1, beta1=0.8, beta2=0.9, tau=0.01)
    first = run_round(original, model(1.0, -1.0), [(0.3, 5), (-0.1, 2)])
    restored = cls(server_lr=0.1, beta1=0.8, beta2=0.9, tau=0.01)
    restored.set_state(original.get_state())

    expected = run_round(original, first, [(0.2, 4)])
    actual = run_round(restored, first, [(0.2, 4)])

    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


def test_a_half_collected_round_survives_a_restart() -> None:
    uninterrupted = FedAdam(server_lr=0.1)
    expected = run_round(uninterrupted, model(1.0), [(0.5, 2), (-0.25, 6)])
    before = FedAdam(server_lr=0.1)
    before.begin(model(1.0))
    before.accumulate(model(0.5), 2)

    after = FedAdam(server_lr=0.1)
    after.set_state(before.get_state())
    after.accumulate(model(-0.25), 6)

    np.testing.assert_array_equal(after.finalize()["w"], expected["w"])


def test_moments_saved_by_fedadam_are_refused_by_fedavg() -> None:
    fedadam = FedAdam()
    run_round(fedadam, model(1.0), [(0.5, 2)])

    with pytest.raises(AggregationError, match="keeps no optimizer state"):
        FedAvg().set_state(fedadam.get_state())


def test_moments_of_another_architecture_are_refused() -> None:
    aggregator = FedAdam()
    run_round(aggregator, model(1.0), [(0.5, 2)])

    aggregator.begin({"w": np.zeros(2), "b": np.zeros(1)})
    aggregator.accumulate({"w": np.ones(2), "b": np.ones(1)}, 1)
    with pytest.raises(AggregationError, match="architecture changed"):
        aggregator.finalize()


def test_a_step_that_overflows_is_refused_and_leaves_the_moments_alone() -> None:
    aggregator = FedAdam(server_lr=1e308)

    with pytest.raises(AggregationError, match="non-finite"):
        aggregator.from_sum({"w": scalar(1e308)}, {"w": scalar(1.0)}, 1)
    assert aggregator.get_state() == {}


@pytest.mark.parametrize("cls", [FedAvg, FedAdam, FedYogi])
def test_from_sum_equals_finalize_for_the_same_updates(cls: type[Aggregator]) -> None:
    global_weights = model(0.5, -0.5)
    updates = [(model(0.2, 0.1), 3), (model(-0.4, 0.3), 5)]
    streaming, summed = cls(), cls()
    streaming.begin(global_weights)
    for delta, n in updates:
        streaming.accumulate(delta, n)
    weighted_sum = {k: np.sum([n * d[k] for d, n in updates], axis=0) for k in global_weights}

    from_sum = summed.from_sum(global_weights, weighted_sum, 8)

    expected = streaming.finalize()
    for key in expected:
        np.testing.assert_allclose(from_sum[key], expected[key], rtol=0, atol=1e-12)


# -- refusals ------------------------------------------------------------------------------------


def open_round() -> FedAvg:
    aggregator = FedAvg()
    aggregator.begin(model(1.0))
    return aggregator


def test_an_update_with_another_shape_is_refused() -> None:
    with pytest.raises(AggregationError, match="shape"):
        open_round().accumulate({"w": np.zeros(2), "b": scalar(0.0)}, 1)


def test_an_update_with_a_missing_name_is_refused() -> None:
    with pytest.raises(AggregationError, match="missing \\['b'\\]"):
        open_round().accumulate({"w": scalar(0.0)}, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_update_with_non_finite_values_is_refused(bad: float) -> None:
    aggregator = open_round()

    with pytest.raises(AggregationError, match="NaN or infinity"):
        aggregator.accumulate(model(bad), 1)
    aggregator.accumulate(model(2.0), 1)
    assert aggregator.finalize()["w"] == pytest.approx([3.0])


@pytest.mark.parametrize("count", [0, -3])
def test_an_update_without_examples_is_refused(count: int) -> None:
    with pytest.raises(AggregationError, match="must be positive"):
        open_round().accumulate(model(1.0), count)


def test_finalize_with_nothing_accumulated_is_refused() -> None:
    with pytest.raises(AggregationError, match="no accepted update"):
        open_round().finalize()


def test_an_update_before_begin_is_refused() -> None:
    with pytest.raises(AggregationError, match="no round is open"):
        FedAvg().accumulate(model(1.0), 1)


def test_a_closed_round_cannot_be_finalized_twice() -> None:
    aggregator = open_round()
    aggregator.accumulate(model(1.0), 1)
    aggregator.finalize()

    with pytest.raises(AggregationError, match="no round is open"):
        aggregator.finalize()


def test_from_sum_refuses_a_zero_total() -> None:
    with pytest.raises(AggregationError, match="total_examples must be positive"):
        FedAvg().from_sum(model(1.0), model(1.0), 0)


@pytest.mark.parametrize(
    ("cls", "knobs"),
    [
        (FedAvg, {"server_lr": 0.0}),
        (FedAdam, {"beta1": 1.0}),
        (FedYogi, {"tau": -1e-3}),
        (FedProx, {"proximal_mu": -0.1}),
    ],
)
def test_out_of_range_knobs_are_refused_on_construction(
    cls: type[Aggregator], knobs: dict[str, float]
) -> None:
    with pytest.raises(AggregationError):
        cls(**knobs)


def test_aggregation_errors_are_aipipe_errors() -> None:
    assert issubclass(AggregationError, AipipeError)


# -- registry ------------------------------------------------------------------------------------


def test_the_registry_names_every_aggregator_a_study_may_ask_for() -> None:
    robust = {"trimmed_mean", "median", "krum", "centered_clip"}
    assert set(AGGREGATORS) == {"fedavg", "fedprox", "fedadam", "fedyogi"} | robust
    assert set(AGGREGATORS) == set(get_args(Aggregation.model_fields["name"].annotation))


def test_an_unknown_aggregator_name_lists_the_known_ones() -> None:
    with pytest.raises(AggregationError, match="fedadam, fedavg, fedprox, fedyogi"):
        make_aggregator("fedmedian")


def test_a_knob_the_aggregator_does_not_take_is_refused_with_the_ones_it_does() -> None:
    with pytest.raises(AggregationError, match="does not take beta1; it takes: server_lr"):
        make_aggregator("fedavg", beta1=0.9)


def test_aggregator_for_passes_the_study_knobs() -> None:
    spec = Aggregation(name="fedyogi", server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)

    aggregator = aggregator_for(spec, proximal_mu=0.3)

    assert isinstance(aggregator, FedYogi)
    assert (aggregator.server_lr, aggregator.beta1, aggregator.beta2, aggregator.tau) == (
        0.05,
        0.8,
        0.95,
        1e-2,
    )


def test_aggregator_for_gives_fedprox_the_training_mu() -> None:
    aggregator = aggregator_for(Aggregation(name="fedprox"), proximal_mu=0.3)

    assert isinstance(aggregator, FedProx)
    assert aggregator.proximal_mu == 0.3


def test_fedprox_aggregates_exactly_as_fedavg() -> None:
    updates = [(4.0, 1), (0.0, 3)]

    prox = run_round(FedProx(proximal_mu=1.0), model(10.0), updates)

    assert prox["w"] == pytest.approx(run_round(FedAvg(), model(10.0), updates)["w"])


# -- proximal term -------------------------------------------------------------------------------


def test_proximal_term_is_half_mu_times_the_squared_distance() -> None:
    # μ/2·‖w − w_g‖² = 0.25·((1 − 0)² + (2 − 0.5)² + (−1 − (−1))²) = 0.25·3.25 = 0.8125.
    local = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0])]
    anchor = [torch.tensor([0.0, 0.5]), torch.tensor([-1.0])]

    value = proximal_term(local, anchor, mu=0.5)

    assert value.item() == pytest.approx(0.8125)


def test_proximal_term_gradient_is_mu_times_the_distance_and_spares_the_global() -> None:
    # ∂/∂w μ/2·‖w − w_g‖² = μ·(w − w_g) = 0.5·([1, 2] − [0, 0.5]) = [0.5, 0.75].
    local = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor = torch.tensor([0.0, 0.5], requires_grad=True)

    proximal_term([local], [anchor], mu=0.5).backward()

    assert local.grad is not None
    assert local.grad.tolist() == pytest.approx([0.5, 0.75])
    assert anchor.grad is None


def test_proximal_term_refuses_parameters_of_another_shape() -> None:
    with pytest.raises(AggregationError, match="shape"):
        proximal_term([torch.zeros(2)], [torch.zeros(3)], mu=0.1)


def test_proximal_term_refuses_a_different_number_of_parameters() -> None:
    with pytest.raises(AggregationError, match="2 local and 1 global"):
        proximal_term([torch.zeros(2), torch.zeros(1)], [torch.zeros(2)], mu=0.1)
