"""What nodes put inside masked or encrypted updates, and how the hub reads the sum back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aipipe.aggregation import FedAdam, FedAvg
from aipipe.aggregation.base import Aggregator, Weights
from aipipe.errors import StudyError
from aipipe.hub import secure as hub_secure
from aipipe.secure.encoding import (
    UpdateLayout,
    check_sum,
    contribution,
    fixed_point_codec,
    mean_from_sum,
    value_range,
)
from aipipe.secure.errors import SecureAggregationError
from aipipe.study.spec import StudySpec, load_study

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/heart-disease/study.yaml"
SHAPES = {"head.weight": (1, 3), "head.bias": (1,)}
LAYOUT = UpdateLayout.of({k: np.zeros(s) for k, s in SHAPES.items()})


def delta(seed: int, scale: float = 0.1) -> dict[str, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, scale, s) for k, s in SHAPES.items()}


def encode(d: dict[str, Any], n: int, clip: float = 10.0) -> npt.NDArray[np.float64]:
    return contribution(d, n, layout=LAYOUT, update_clip=clip, max_examples=1000)


def test_a_contribution_is_the_weight_then_the_weighted_delta_in_name_order() -> None:
    d = delta(0)

    x = encode(d, 250)

    assert x[0] == 0.25
    flat = np.concatenate([d["head.bias"].ravel(), d["head.weight"].ravel()])
    np.testing.assert_allclose(x[1:], 0.25 * flat)


def test_a_delta_longer_than_update_clip_is_projected_onto_the_ball() -> None:
    d = delta(1, scale=50.0)

    x = encode(d, 1000, clip=2.0)

    assert np.linalg.norm(x[1:]) == pytest.approx(2.0)


def test_a_site_above_max_examples_weighs_as_max_examples() -> None:
    assert encode(delta(2), 5000)[0] == 1.0


def test_every_coordinate_lies_within_the_codecs_range() -> None:
    x = encode(delta(3, scale=100.0), 999, clip=7.0)

    assert np.max(np.abs(x)) <= value_range(7.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=1000), min_size=3, max_size=8))
def test_the_mean_from_a_sum_of_contributions_is_the_fedavg_mean(counts: list[int]) -> None:
    deltas = [delta(i) for i in range(len(counts))]
    total = np.sum([encode(d, n) for d, n in zip(deltas, counts, strict=True)], axis=0)

    weighted, examples = mean_from_sum(total, layout=LAYOUT, max_examples=1000)

    assert examples == sum(counts)
    for key in SHAPES:
        expected = sum(n * d[key] for d, n in zip(deltas, counts, strict=True)) / sum(counts)
        np.testing.assert_allclose(weighted[key] / examples, expected, rtol=1e-9, atol=1e-12)


def test_a_fixed_point_sum_decodes_to_the_mean_within_the_quantisation_error() -> None:
    counts = [199, 172, 30, 85]
    xs = [encode(delta(i), n) for i, n in enumerate(counts)]
    codec = fixed_point_codec(10.0, len(xs), 32)
    words = np.sum([codec.encode(x) for x in xs], axis=0, dtype=codec.dtype)

    decoded = codec.decode_sum(words, len(xs))

    assert np.max(np.abs(decoded - np.sum(xs, axis=0))) <= codec.error_bound(len(xs))


def test_fedadam_runs_on_the_decoded_sum_like_on_the_plain_one() -> None:
    counts = [50, 120, 300]
    deltas = [delta(10 + i) for i in range(3)]
    base: Weights = {k: np.zeros(s) for k, s in SHAPES.items()}
    total = np.sum([encode(d, n) for d, n in zip(deltas, counts, strict=True)], axis=0)
    weighted, examples = mean_from_sum(total, layout=LAYOUT, max_examples=1000)
    plain = FedAdam()
    plain.begin(base)
    for d, n in zip(deltas, counts, strict=True):
        plain.accumulate(d, n)

    from_secure = FedAdam().from_sum(base, weighted, examples)

    for key, value in plain.finalize().items():
        np.testing.assert_allclose(from_secure[key], value, rtol=1e-9)


def test_a_sum_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(SecureAggregationError, match="this model takes 5"):
        mean_from_sum(np.ones(4), layout=LAYOUT, max_examples=1000)


def test_a_sum_without_weight_is_refused() -> None:
    with pytest.raises(SecureAggregationError, match="no usable weight"):
        mean_from_sum(np.zeros(5), layout=LAYOUT, max_examples=1000)


# -- what a hub refuses at publish -------------------------------------------------------------


class _Median(FedAvg):
    """Stands in for an aggregator that needs every update on its own (median, Krum)."""

    name: ClassVar[str] = "median"
    requires_individual_updates: ClassVar[bool] = True


def secure_spec(**fields: Any) -> StudySpec:
    raw = load_study(EXAMPLE).model_dump(mode="json")
    return StudySpec.model_validate({**raw, "secure": "secagg", "min_nodes": 3, **fields})


def test_a_secure_study_with_an_aggregator_that_needs_single_updates_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def robust(*_: object) -> Aggregator:
        return _Median()

    monkeypatch.setattr(hub_secure, "aggregator_for", robust)

    with pytest.raises(StudyError, match="'median' needs every update on its own"):
        hub_secure.SecureRounds.check_spec(secure_spec())


def test_a_secure_study_with_fedadam_is_accepted() -> None:
    hub_secure.SecureRounds.check_spec(secure_spec(aggregation={"name": "fedadam"}))


def test_a_sum_that_valid_contributions_can_make_passes_the_range_check() -> None:
    total = np.sum([encode(delta(i, scale=5.0), 1000) for i in range(3)], axis=0)

    check_sum(total, 3, 10.0, tolerance=1e-3)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([3.5, 0.1, 0.1, 0.1, 0.1]),  # Σr > n: a node inflated its weight past r ≤ 1
        np.array([0.0, 0.1, 0.1, 0.1, 0.1]),  # no weight at all
        np.array([1.0, 0.1, 31.0, 0.1, 0.1]),  # |Σx| > n · update_clip
        np.array([1.0, np.nan, 0.1, 0.1, 0.1]),
    ],
)
def test_a_sum_no_three_clipped_contributions_can_make_is_refused(
    bad: npt.NDArray[np.float64],
) -> None:
    with pytest.raises(SecureAggregationError, match="outside what clipped inputs can add up to"):
        check_sum(bad, 3, 10.0, tolerance=1e-3)
