"""Pooling sites' preprocessors equals fitting one preprocessor on all their train rows."""

from __future__ import annotations

import numpy as np
import pytest

from aipipe.errors import StudyError
from aipipe.study.features import Preprocessor


def _fit(x: np.ndarray) -> Preprocessor:
    return Preprocessor({}, x.mean(axis=0), x.std(axis=0, ddof=1))


def test_pooled_mean_and_std_equal_those_of_the_union() -> None:
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(0, 1, (30, 4)), rng.normal(3, 2, (50, 4)), rng.normal(-1, 5, (7, 4))

    pooled = Preprocessor.pooled([(len(x), _fit(x)) for x in (a, b, c)])

    union = np.concatenate([a, b, c])
    assert pooled.mean is not None and pooled.std is not None
    np.testing.assert_allclose(pooled.mean, union.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled.std, union.std(axis=0, ddof=1), rtol=1e-12)


def test_pooled_fills_weight_each_site_by_its_train_size() -> None:
    parts = [(10, Preprocessor({2: 1.0}, None, None)), (30, Preprocessor({2: 5.0}, None, None))]

    assert Preprocessor.pooled(parts).fills == {2: 4.0}


def test_pooling_nothing_says_no_site_has_reported() -> None:
    with pytest.raises(StudyError, match="no site"):
        Preprocessor.pooled([])
