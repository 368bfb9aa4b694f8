"""Fixed point mod 2^k: round trip, sums that never wrap, and the n/(2·scale) error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aipipe.secure.errors import FixedPointRangeError
from aipipe.secure.fixedpoint import FixedPointCodec, choose_scale


def wrapped_sum(words: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(words[0])
    for w in words:
        total += w  # unsigned NumPy arithmetic wraps: this is the sum mod 2^k
    return total


def test_one_vector_round_trips_within_half_a_step() -> None:
    codec = FixedPointCodec(clip=1.0, n_max=10)
    x = np.array([-1.0, -0.5, 0.0, 1e-9, 0.333, 1.0])
    got = codec.decode_sum(codec.encode(x), 1)
    assert np.max(np.abs(got - x)) <= codec.error_bound(1) == 0.5 / codec.scale


def test_the_scale_is_the_largest_power_of_two_that_cannot_wrap() -> None:
    scale = choose_scale(1.0, 100, 32)
    assert math.log2(scale).is_integer()
    assert 100 * (1.0 * scale + 0.5) <= 2**31 - 1 < 100 * (2 * scale + 0.5)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_n_max_vectors_at_the_clip_sum_without_wrapping(bits: int, sign: float) -> None:
    codec = FixedPointCodec(clip=2.5, n_max=1000, bits=bits)  # type: ignore[arg-type]
    extreme = np.full(4, sign * 2.5)
    total = wrapped_sum([codec.encode(extreme)] * 1000)
    np.testing.assert_allclose(codec.decode_sum(total, 1000), sign * 2500.0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    clip=st.floats(1e-3, 1e3),
    n=st.integers(1, 200),
    bits=st.sampled_from([32, 64]),
    data=st.data(),
)
def test_the_decoded_sum_is_within_n_over_two_scale(
    clip: float, n: int, bits: int, data: st.DataObject
) -> None:
    codec = FixedPointCodec(clip=clip, n_max=200, bits=bits)  # type: ignore[arg-type]
    values = st.floats(-clip, clip, allow_nan=False)
    xs = data.draw(arrays(np.float64, (n, 5), elements=values))
    got = codec.decode_sum(wrapped_sum([codec.encode(x) for x in xs]), n)
    exact = np.array([math.fsum(col) for col in xs.T])
    # Slack for the float64 rounding of the reference itself, not of the codec.
    assert np.all(np.abs(got - exact) <= codec.error_bound(n) * (1 + 1e-9) + 1e-12 * n * clip)


@pytest.mark.parametrize("bad", [1.0000001, -7.0, np.nan, np.inf])
def test_values_outside_the_clip_are_refused(bad: float) -> None:
    codec = FixedPointCodec(clip=1.0, n_max=10)
    with pytest.raises(FixedPointRangeError, match=r"outside ±1\.0"):
        codec.encode(np.array([0.0, bad]))


def test_a_sum_of_more_than_n_max_inputs_is_refused() -> None:
    codec = FixedPointCodec(clip=1.0, n_max=10)
    with pytest.raises(FixedPointRangeError, match="at most 10"):
        codec.decode_sum(codec.encode(np.zeros(3)), 11)


def test_a_sum_that_is_still_masked_is_refused_instead_of_decoded() -> None:
    codec = FixedPointCodec(clip=1.0, n_max=10)
    masked = np.random.default_rng(0).integers(0, 2**32, 100, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(FixedPointRangeError, match="not fully unmasked"):
        codec.decode_sum(masked, 10)


def test_too_many_summands_for_32_bits_are_refused() -> None:
    with pytest.raises(FixedPointRangeError, match="cannot fit"):
        FixedPointCodec(clip=1.0, n_max=2**32)
