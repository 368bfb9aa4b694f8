"""The node's DP noise is secret and fresh: the same round, data and model never repeat it.

If the seed behind Poisson sampling and the Gaussian noise could be recomputed (say, from the
node, study and round names), anyone could regenerate the noise and subtract it from an update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aipipe.models import build_model, weights_to_arrays
from aipipe.node.worker import NodeWorker
from aipipe.study.features import FeatureMatrix
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import load_study
from aipipe.wire import RoundWork
from aipipe.wire.tensors import encode_arrays

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/heart-disease/study.yaml"


class _Weights:
    """The one HubClient call `_local_update` makes: the round's base model."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def model_weights(self, version: str) -> bytes:
        return self.blob


def test_two_trainings_of_the_same_round_add_different_noise() -> None:
    spec = load_study(EXAMPLE)
    columns = spec.columns()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, len(columns)))
    y = (rng.random(64) > 0.5).astype(np.float64)
    matrix = FeatureMatrix(columns, x, y, x, y, [], [], 64, Preprocessor({}, None, None))
    blob = encode_arrays(weights_to_arrays(build_model(spec.model, len(columns), seed=0)))
    client: Any = _Weights(blob)
    worker = NodeWorker("h1", store=None, client=client, identity=None, audit=None)  # type: ignore[arg-type]
    item = RoundWork(
        kind="train", study=spec.name, round=1, version="0" * 64, study_digest="0" * 64
    )

    first = worker._local_update(spec, item, matrix, sigma=1.0)
    second = worker._local_update(spec, item, matrix, sigma=1.0)

    assert any(not np.array_equal(first.delta[k], second.delta[k]) for k in first.delta)
