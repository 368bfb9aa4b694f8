"""The hub pools sites' DP-noised sums into the preprocessing that hub-side CDS applies."""

from __future__ import annotations

import numpy as np
import pytest

from aipipe.privacy.statistics import NoisedSums, moments, noise_multiplier, pool, release

# -- issue 10, item 4: the hub pools DP-noised sums, not exact means and stds --------------------


def test_pooled_moments_from_noised_sums_of_large_sites_are_close_to_the_truth() -> None:
    rng = np.random.default_rng(1)
    ranges = [(0.0, 120.0), (0.0, 700.0), (0.0, 1.0)]
    sites = [
        np.column_stack([rng.normal(54, 9, n), rng.normal(240, 50, n), rng.random(n) < 0.7]).astype(
            np.float64
        )
        for n in (400_000, 300_000)
    ]
    z = noise_multiplier(0.1, 1e-5, "prv")  # the default ε for statistics of a study at ε = 1

    total = pool([release(x, ranges, multiplier=z, max_rows=10**6) for x in sites])
    mean, std = moments(total, ranges)

    union = np.clip(np.concatenate(sites), [r[0] for r in ranges], [r[1] for r in ranges])
    np.testing.assert_allclose(mean, union.mean(axis=0), rtol=0.01)
    # The noise on Σu² moves age's small std by 2 % (one standard deviation over 40 draws at
    # 700k rows, 5.5 % at most); 15 % is seven of them, so this does not fail by chance.
    np.testing.assert_allclose(std, union.std(axis=0, ddof=1), rtol=0.15)


def test_moments_of_a_tiny_noised_count_stay_finite_inside_the_range() -> None:
    ranges = [(0.0, 120.0), (-3.0, 7.0)]
    noised = NoisedSums(n=-40.0, sums=[-900.0, 30.0], squares=[-5e4, -10.0])

    mean, std = moments(noised, ranges)

    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std))
    assert np.all(mean >= [0.0, -3.0]) and np.all(mean <= [120.0, 7.0])
    assert np.all(std > 0) and np.all(std <= [60.0, 5.0])  # at most half the range's width


def test_a_site_above_max_rows_weighs_as_max_rows() -> None:
    x = np.full((5000, 1), 3.0)

    released = release(x, [(0.0, 10.0)], multiplier=1e-3, max_rows=1000)

    assert released.n == pytest.approx(1000, abs=0.1)
    assert released.sums[0] == pytest.approx(3000, abs=1.0)
