"""Robust aggregators (trimmed mean, median, Krum, centred clipping) and the anomaly scores.

Hand-computed cases on small arrays: node i's update is a vector of a few coordinates, the
global model is zero unless a test says otherwise, so the new global model is the robust delta.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from aipipe.aggregation import (
    AGGREGATORS,
    AggregationError,
    CenteredClip,
    CoordinateMedian,
    Krum,
    RobustAggregator,
    TrimmedMean,
    Weights,
    aggregator_for,
    make_aggregator,
    robust_reference,
    update_scores,
)
from aipipe.aggregation.robust import (
    krum_scores,
    order_statistics,
    sorted_rows,
    trimmed_mean,
)
from aipipe.errors import StudyError
from aipipe.hub import secure as hub_secure
from aipipe.study.blocks import Aggregation
from aipipe.study.spec import StudySpec, load_study
from aipipe.wire.tensors import decode_arrays, encode_arrays

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/heart-disease/study.yaml"
ROBUST = ("trimmed_mean", "median", "krum", "centered_clip")


def update(*values: float) -> Weights:
    """A two-array model: `w` holds all values but the last, `b` the last."""
    arr = np.array(values, dtype=np.float64)
    return {"w": arr[:-1].copy(), "b": arr[-1:].copy()}


def flat(weights: Weights) -> list[float]:
    return [*weights["w"].tolist(), *weights["b"].tolist()]


def aggregate(
    aggregator: RobustAggregator,
    updates: Sequence[Weights],
    counts: Sequence[int] | None = None,
    base: Weights | None = None,
) -> list[float]:
    size = len(flat(updates[0]))
    aggregator.begin(base if base is not None else update(*[0.0] * size))
    for i, delta in enumerate(updates):
        aggregator.accumulate(delta, 10 if counts is None else counts[i])
    return flat(aggregator.finalize())


# five nodes, one outlier per coordinate (a different node in each)
FIVE = [update(1, -50), update(2, 0), update(3, 1), update(4, 2), update(100, 3)]


# -- trimmed mean --------------------------------------------------------------------------------


def test_trimmed_mean_drops_floor_beta_n_per_side_in_each_coordinate() -> None:
    # β=0.2, n=5: ⌊1.0⌋ = 1 per side. w: mean(2, 3, 4) = 3; b: mean(0, 1, 2) = 1.
    assert aggregate(TrimmedMean(trim=0.2), FIVE) == pytest.approx([3.0, 1.0])


def test_trimmed_mean_rounds_the_trimmed_count_down() -> None:
    # β=0.19, n=5: ⌊0.95⌋ = 0, the plain mean: (1+2+3+4+100)/5 = 22, (−50+0+1+2+3)/5 = −8.8.
    assert aggregate(TrimmedMean(trim=0.19), FIVE) == pytest.approx([22.0, -8.8])


def test_trimmed_mean_applies_the_server_learning_rate_to_the_global_model() -> None:
    new = aggregate(TrimmedMean(trim=0.2, server_lr=0.5), FIVE, base=update(10, 10))

    assert new == pytest.approx([10 + 0.5 * 3, 10 + 0.5 * 1])


@pytest.mark.parametrize("trim", [0.5, 0.7, -0.1, True, float("nan")])
def test_a_trim_of_half_or_more_is_refused(trim: float) -> None:
    with pytest.raises(AggregationError, match=r"trim must be in \[0, 0.5\)"):
        TrimmedMean(trim=trim)
    with pytest.raises(ValidationError):
        Aggregation(name="trimmed_mean", trim=trim)


def test_a_trim_that_would_leave_nothing_is_refused() -> None:
    four = np.array([[1.0], [2.0], [3.0], [4.0]])

    with pytest.raises(AggregationError, match="cannot drop 2 per side: nothing would remain"):
        trimmed_mean(four, 2)


@pytest.mark.parametrize(("name", "knobs"), [("trimmed_mean", {"trim": 1 / 3}), ("median", {})])
def test_up_to_floor_beta_n_malicious_nodes_cannot_push_a_coordinate_outside_the_honest_range(
    name: str, knobs: dict[str, float]
) -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        honest = rng.normal(0.0, 1.0, size=(8, 6))
        malicious = rng.choice([-1e6, 1e6], size=(4, 6)) * rng.uniform(0, 1, size=(4, 6))
        updates = [update(*row) for row in np.vstack([malicious, honest])[rng.permutation(12)]]
        aggregator = make_aggregator(name, **knobs)
        assert isinstance(aggregator, RobustAggregator)

        result = np.array(aggregate(aggregator, updates))

        assert np.all(result >= honest.min(axis=0)) and np.all(result <= honest.max(axis=0))


@pytest.mark.parametrize("n", range(1, 17))
def test_the_sorting_network_sorts_every_zero_one_input_so_it_sorts_everything(n: int) -> None:
    # Knuth's 0-1 principle: a comparator network that sorts all 2^n inputs of 0s and 1s sorts
    # every input. Each column is one of the 2^n inputs.
    columns = (np.arange(2**n)[None, :] >> np.arange(n)[:, None]) & 1

    ordered = np.stack(sorted_rows(columns.astype(np.float64)))

    assert np.array_equal(ordered, np.sort(columns, axis=0))


@pytest.mark.parametrize("n", [17, 31, 32, 33, 50])
def test_sorted_rows_match_numpy_past_the_exhaustive_sizes(n: int) -> None:
    updates = np.random.default_rng(n).normal(size=(n, 257))

    assert np.array_equal(np.stack(sorted_rows(updates)), np.sort(updates, axis=0))


@pytest.mark.parametrize("n", [2, 5, 12, 13, 32, 40])
def test_order_statistics_of_the_middle_ranks_match_a_full_sort(n: int) -> None:
    updates = np.random.default_rng(n).integers(-3, 4, size=(n, 301)).astype(np.float64)
    ordered = np.sort(updates, axis=0)

    for ranks in [(n // 2,), (n // 2 - 1, n // 2), tuple(range(n // 4, n - n // 4)), (0, n - 1)]:
        selected = order_statistics(updates, ranks)
        assert np.array_equal(np.stack(selected), ordered[list(ranks)])


# -- median --------------------------------------------------------------------------------------


def test_median_of_an_odd_count_is_the_middle_value_of_each_coordinate() -> None:
    assert aggregate(CoordinateMedian(), FIVE) == pytest.approx([3.0, 1.0])


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    four = [update(1, 5), update(2, 5), update(3, 5), update(100, -7)]

    # w: (2 + 3)/2 = 2.5; b: sorted −7, 5, 5, 5 → (5 + 5)/2 = 5.
    assert aggregate(CoordinateMedian(), four) == pytest.approx([2.5, 5.0])


# -- Krum ----------------------------------------------------------------------------------------

# 1-D updates 0, 1, 2, 3, 100 (the second coordinate is 0 everywhere). With f = 1 each score sums
# the n − f − 2 = 2 smallest squared distances: 0 → 1+4 = 5, 1 → 1+1 = 2, 2 → 1+1 = 2,
# 3 → 1+4 = 5, 100 → 97² + 98² = 19013.
LINE = [update(v, 0) for v in (0, 1, 2, 3, 100)]


def test_krum_scores_sum_the_nearest_n_minus_f_minus_2_squared_distances() -> None:
    matrix = np.array([flat(u) for u in LINE])

    assert krum_scores(matrix, 1).tolist() == [5.0, 2.0, 2.0, 5.0, 19013.0]


def test_krum_picks_the_best_scored_update_and_a_tie_goes_to_the_earlier_one() -> None:
    assert aggregate(Krum(byzantine=1), LINE) == [1.0, 0.0]  # 1 and 2 tie at 2: 1 came first
    swapped = [LINE[0], LINE[2], LINE[1], LINE[3], LINE[4]]
    assert aggregate(Krum(byzantine=1), swapped) == [2.0, 0.0]


def test_multi_krum_averages_the_m_best_scored_with_ties_in_arrival_order() -> None:
    # m=3: scores 2, 2 (updates 1, 2), then the 5s tie: update 0 came before update 3.
    assert aggregate(Krum(byzantine=1, multi=3), LINE) == pytest.approx([1.0, 0.0])
    # m=4 adds update 3: (1 + 2 + 0 + 3)/4.
    assert aggregate(Krum(byzantine=1, multi=4), LINE) == pytest.approx([1.5, 0.0])


def test_multi_krum_refuses_to_keep_more_than_n_minus_f() -> None:
    with pytest.raises(AggregationError, match=r"needs 1 ≤ m ≤ n − f = 4"):
        aggregate(Krum(byzantine=1, multi=5), LINE)


def test_krum_refuses_fewer_than_2f_plus_3_updates_naming_n_f_and_the_fix() -> None:
    aggregator = Krum(byzantine=1)

    with pytest.raises(AggregationError) as refused:
        aggregate(aggregator, LINE[:4])

    message = str(refused.value)
    assert "byzantine f=1" in message and "n ≥ 2f + 3 = 5" in message and "got n=4" in message
    assert "lower `byzantine` to at most 0" in message and "min_nodes" in message


def test_krum_can_say_before_any_round_whether_a_study_min_nodes_is_enough() -> None:
    Krum(byzantine=1, multi=3).check_round_size(5)  # 5 ≥ 2·1 + 3 and 3 ≤ 5 − 1
    with pytest.raises(AggregationError, match="got n=4"):
        Krum(byzantine=1).check_round_size(4)
    with pytest.raises(AggregationError, match="lower `multi` or raise the study's min_nodes"):
        Krum(byzantine=1, multi=5).check_round_size(5)
    for name in ("trimmed_mean", "median", "centered_clip"):
        robust(name).check_round_size(1)


@pytest.mark.parametrize(("knob", "value"), [("byzantine", -1), ("multi", 0), ("multi", 1.5)])
def test_krum_knobs_are_validated_on_entry(knob: str, value: Any) -> None:
    with pytest.raises(AggregationError, match=knob):
        Krum(**{knob: value})


# -- centred clipping ----------------------------------------------------------------------------


def test_centered_clip_clips_each_update_to_tau_around_a_zero_first_centre() -> None:
    three = [update(0.5, 0), update(0, 0.5), update(3, 4)]  # ‖(3, 4)‖ = 5 → (0.6, 0.8)

    result = aggregate(CenteredClip(clip_radius=1.0, iterations=1), three)

    assert result == pytest.approx([(0.5 + 0 + 0.6) / 3, (0 + 0.5 + 0.8) / 3])


def test_centered_clip_starts_the_next_round_from_the_previous_aggregate() -> None:
    # Every node sends (10, 0); τ = 1. Round 1 from 0: (1, 0). Round 2 from (1, 0): (2, 0).
    same = [update(10, 0)] * 3
    aggregator = CenteredClip(clip_radius=1.0)

    assert aggregate(aggregator, same) == pytest.approx([1.0, 0.0])
    state = aggregator.get_state()
    assert aggregate(aggregator, same) == pytest.approx([2.0, 0.0])

    restarted = CenteredClip(clip_radius=1.0)
    restarted.load_optimizer_state(decode_arrays(encode_arrays(state)))
    assert aggregate(restarted, same) == pytest.approx([2.0, 0.0])


@pytest.mark.parametrize("iterations", [1, 3])
def test_one_update_times_1000_moves_centered_clip_by_at_most_2_l_tau_over_n(
    iterations: int,
) -> None:
    rng = np.random.default_rng(7)
    honest = [update(*rng.normal(0.0, 0.3, size=4)) for _ in range(5)]
    # the attacker turns its update around and scales it ×1000 (a model-replacement push)
    attacked = [*honest[:-1], {k: -1000.0 * v for k, v in honest[-1].items()}]
    tau, n = 1.0, len(honest)

    clean = np.array(aggregate(CenteredClip(clip_radius=tau, iterations=iterations), honest))
    moved = np.array(aggregate(CenteredClip(clip_radius=tau, iterations=iterations), attacked))

    shift = float(np.linalg.norm(moved - clean))
    assert 0 < shift <= 2 * iterations * tau / n + 1e-12
    fedavg_shift = float(np.linalg.norm(np.mean([flat(u) for u in attacked], axis=0)))
    assert fedavg_shift > 100 * shift  # the plain mean follows the attacker


def test_a_centre_saved_for_another_model_is_refused() -> None:
    aggregator = CenteredClip()
    aggregator.load_optimizer_state({"centre/w": np.zeros(3), "centre/b": np.zeros(1)})

    with pytest.raises(AggregationError, match="centre does not fit the model"):
        aggregate(aggregator, FIVE)


# -- what every robust aggregator shares ---------------------------------------------------------


def robust(name: str) -> RobustAggregator:
    aggregator = make_aggregator(name)
    assert isinstance(aggregator, RobustAggregator)
    return aggregator


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_refused_before_anything_of_it_is_kept(
    name: str, bad: float
) -> None:
    aggregator = robust(name)
    aggregator.begin(update(0, 0))
    for delta in FIVE:
        aggregator.accumulate(delta, 10)

    with pytest.raises(AggregationError, match="holds NaN or infinity"):
        aggregator.accumulate({"w": np.array([bad]), "b": np.array([1.0])}, 10)

    assert aggregator.get_state()["round/updates"].shape == (5, 2)
    assert np.all(np.isfinite(aggregator.finalize()["w"]))


@pytest.mark.parametrize("name", ROBUST)
def test_the_example_count_a_node_claims_does_not_weigh_its_update(name: str) -> None:
    honest = aggregate(robust(name), FIVE, counts=[10, 10, 10, 10, 10])
    inflated = aggregate(robust(name), FIVE, counts=[10, 10, 10, 10, 10**9])

    assert inflated == honest


def replay(name: str, updates: Sequence[Weights], state_after: int) -> list[float]:
    """Accumulate `state_after` updates, carry the state to a fresh aggregator, finish there."""
    first = robust(name)
    first.begin(update(1, 1))
    for delta in updates[:state_after]:
        first.accumulate(delta, 10)
    saved = decode_arrays(encode_arrays(first.get_state()))  # as a hub would store it
    second = robust(name)
    second.set_state(saved)
    for delta in updates[state_after:]:
        second.accumulate(delta, 10)
    return flat(second.finalize())


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("state_after", [0, 2, 5])
def test_a_round_resumed_from_saved_state_gives_the_same_model(name: str, state_after: int) -> None:
    uninterrupted = aggregate(robust(name), FIVE, base=update(1, 1))

    assert replay(name, FIVE, state_after) == pytest.approx(uninterrupted, abs=0, rel=0)


@pytest.mark.parametrize("name", ROBUST)
def test_a_fresh_aggregator_replaying_the_kept_updates_gives_the_same_model(name: str) -> None:
    # What the hub's finish() does for these aggregators: each payload kept as a blob, then a
    # fresh aggregator begins on the base model and accumulates them all in the stored order.
    blobs = [encode_arrays({k: v.astype(np.float32) for k, v in u.items()}) for u in FIVE]
    live = aggregate(robust(name), [decode_arrays(b) for b in blobs])

    replayed = aggregate(robust(name), [decode_arrays(b) for b in blobs])

    assert replayed == live


@pytest.mark.parametrize("name", ROBUST)
def test_a_saved_round_that_does_not_add_up_is_refused(name: str) -> None:
    aggregator = robust(name)
    aggregator.begin(update(0, 0))
    aggregator.accumulate(FIVE[0], 10)
    state = aggregator.get_state()

    with pytest.raises(AggregationError, match="corrupt"):
        robust(name).set_state({**state, "round/counts": np.array([10.0, 10.0])})


@pytest.mark.parametrize("name", ROBUST)
def test_a_robust_aggregator_cannot_step_from_a_secure_sum(name: str) -> None:
    with pytest.raises(AggregationError, match="needs every update on its own"):
        robust(name).from_sum(update(0, 0), update(1, 1), 10)


@pytest.mark.parametrize("name", ROBUST)
def test_finalize_without_updates_is_refused(name: str) -> None:
    aggregator = robust(name)
    aggregator.begin(update(0, 0))

    with pytest.raises(AggregationError, match="no accepted update"):
        aggregator.finalize()


# -- registry and study block --------------------------------------------------------------------


def test_the_registry_lists_the_robust_aggregators_as_needing_single_updates() -> None:
    for name in ROBUST:
        assert AGGREGATORS[name].requires_individual_updates
    assert (AGGREGATORS["trimmed_mean"], AGGREGATORS["median"]) == (TrimmedMean, CoordinateMedian)
    assert (AGGREGATORS["krum"], AGGREGATORS["centered_clip"]) == (Krum, CenteredClip)


Check = Callable[[RobustAggregator], bool]


@pytest.mark.parametrize(
    ("block", "check"),
    [
        (
            {"name": "trimmed_mean", "trim": 0.3, "server_lr": 0.5},
            lambda a: (a.trim, a.server_lr) == (0.3, 0.5),
        ),
        ({"name": "median"}, lambda a: a.server_lr == 1.0),
        ({"name": "krum", "byzantine": 2, "multi": 3}, lambda a: (a.byzantine, a.multi) == (2, 3)),
        ({"name": "krum"}, lambda a: (a.byzantine, a.multi) == (1, 1)),
        (
            {"name": "centered_clip", "clip_radius": 0.25, "iterations": 3},
            lambda a: (a.clip_radius, a.iterations) == (0.25, 3),
        ),
    ],
)
def test_aggregator_for_builds_each_robust_aggregator_from_the_study_block(
    block: dict[str, Any], check: Check
) -> None:
    aggregator = aggregator_for(Aggregation.model_validate(block), proximal_mu=0.01)

    assert isinstance(aggregator, AGGREGATORS[block["name"]])
    assert isinstance(aggregator, RobustAggregator) and check(aggregator)


@pytest.mark.parametrize(
    "block",
    [
        {"name": "fedavg", "trim": 0.2},
        {"name": "median", "byzantine": 1},
        {"name": "krum", "clip_radius": 1.0},
        {"name": "krum", "byzantine": -1},
        {"name": "centered_clip", "iterations": 0},
        {"name": "centered_clip", "clip_radius": float("inf")},
    ],
)
def test_a_study_block_with_a_knob_its_aggregator_does_not_take_or_out_of_range_is_refused(
    block: dict[str, Any],
) -> None:
    with pytest.raises(ValidationError):
        Aggregation.model_validate(block)


def study(**fields: Any) -> StudySpec:
    raw = load_study(EXAMPLE).model_dump(mode="json")
    return StudySpec.model_validate({**raw, **fields})


def test_setting_a_robust_knob_changes_the_digest_and_leaving_it_unset_does_not() -> None:
    plain = study(aggregation={"name": "krum"})

    assert study(aggregation={"name": "krum", "byzantine": 1}).digest() != plain.digest()
    assert plain.aggregation.unset_knobs() == {
        "trim",
        "byzantine",
        "multi",
        "clip_radius",
        "iterations",
    }


@pytest.mark.parametrize("name", ROBUST)
def test_a_secure_study_with_a_robust_aggregator_is_refused_at_publish(name: str) -> None:
    spec = study(secure="secagg", min_nodes=3, aggregation={"name": name})

    with pytest.raises(StudyError, match=f"'{name}' needs every update on its own"):
        hub_secure.SecureRounds.check_spec(spec)


# -- anomaly scores ------------------------------------------------------------------------------


def test_the_robust_reference_is_the_coordinate_median() -> None:
    reference = robust_reference(FIVE)

    assert flat(reference) == [3.0, 1.0]


def test_update_scores_give_distance_norm_and_cosine_to_the_reference() -> None:
    reference = update(3, 4)  # norm 5
    deltas = [update(3, 4), update(-6, -8), update(4, -3), update(0, 0)]

    scores = update_scores(deltas, reference)

    assert [s.distance for s in scores] == pytest.approx([0.0, 15.0, np.sqrt(50), 5.0])
    assert [s.norm for s in scores] == pytest.approx([5.0, 10.0, 5.0, 0.0])
    assert [s.cosine for s in scores] == pytest.approx([1.0, -1.0, 0.0, 0.0])
    assert tuple(scores[1]) == pytest.approx((15.0, 10.0, -1.0))  # (distance, norm, cosine)


def test_update_scores_refuse_a_non_finite_or_mismatched_update() -> None:
    with pytest.raises(AggregationError, match="NaN or infinity"):
        update_scores([update(np.nan, 0)], update(1, 1))
    with pytest.raises(AggregationError, match="does not match"):
        update_scores([{"w": np.zeros(1)}], update(1, 1))
    with pytest.raises(AggregationError, match="at least one update"):
        robust_reference([])
