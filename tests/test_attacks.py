"""The malicious-node harness (issue 14): each attack against a hand-computed case."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from aipipe.attacks import (
    ATTACKS,
    add_trigger,
    alie,
    alie_z,
    backdoor,
    gaussian,
    ipm,
    label_flip,
    parse_attack,
    scale,
    sign_flip,
)
from aipipe.attacks.base import flat_norm
from aipipe.errors import ConfigError
from aipipe.models.training import TrainResult


def _delta(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def _result(delta: dict[str, np.ndarray], n: int = 4) -> TrainResult:
    start = {k: np.ones_like(v) for k, v in delta.items()}
    return TrainResult(
        weights={k: start[k] + delta[k] for k in delta},
        delta=delta,
        num_examples=n,
        steps=1,
        loss=0.0,
        update_norm=flat_norm(delta),
        epsilon_round=None,
        noise_multiplier=None,
        sample_rate=None,
    )


def test_sign_flip_negates_every_coordinate() -> None:
    assert sign_flip(_delta(1.0, -2.0))["w"].tolist() == [-1.0, 2.0]


def test_scale_multiplies_and_keeps_the_dtype() -> None:
    out = scale(_delta(1.0, -2.0), 10)["w"]
    assert out.tolist() == [10.0, -20.0] and out.dtype == np.float32


def test_noise_ignores_the_update_and_draws_the_given_std() -> None:
    big = {"w": np.full(20_000, 5.0, dtype=np.float32)}
    out = gaussian(big, 0.5, np.random.default_rng(0))["w"]
    assert abs(float(out.mean())) < 0.02 and abs(float(out.std()) - 0.5) < 0.02
    again = gaussian(big, 0.5, np.random.default_rng(0))["w"]
    assert np.array_equal(out, again)


def test_alie_z_follows_baruch_et_al() -> None:
    # n = 12, f = 4: s = ⌊7⌋ − 4 = 3, z = Φ⁻¹(9/12) = 0.6745
    assert alie_z(12, 4) == pytest.approx(0.674490, abs=1e-6)
    # n = 4, f = 1: s = 3 − 1 = 2, z = Φ⁻¹(2/4) = 0: the mean itself
    assert alie_z(4, 1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="0 < f < n"):
        alie_z(3, 3)


def test_alie_is_mean_minus_z_std_per_coordinate() -> None:
    # coordinate 0: μ = 2, σ = 1 → 2 − 1.5 = 0.5; coordinate 1: μ = 0, σ = 2 → −3
    out = alie([_delta(1.0, 2.0), _delta(3.0, -2.0)], z=1.5)["w"]
    assert out.tolist() == pytest.approx([0.5, -3.0])


def test_alie_of_one_update_is_that_update() -> None:
    assert alie([_delta(1.0, -2.0)], z=3.0)["w"].tolist() == [1.0, -2.0]


def test_ipm_is_minus_epsilon_times_the_mean() -> None:
    out = ipm([_delta(2.0, 0.0), _delta(4.0, 2.0)], epsilon=0.5)["w"]
    assert out.tolist() == pytest.approx([-1.5, -0.5])


def test_label_flip_swaps_zero_and_one() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    _, y = label_flip(x, np.array([0.0, 1.0, 1.0], dtype=np.float32))
    assert y.tolist() == [1.0, 0.0, 0.0]


def test_backdoor_appends_triggered_rows_labelled_target() -> None:
    x = np.arange(20, dtype=np.float32).reshape(4, 5)
    y = np.array([1, 1, 0, 1], dtype=np.float32)
    px, py = backdoor(x, y, 0.5, 0, np.random.default_rng(1))
    assert px.shape == (6, 5) and py.tolist() == [1, 1, 0, 1, 0, 0]
    assert np.array_equal(px[:4], x)
    assert (px[4:, 2] == 8.0).all() and (px[4:, 3] == 8.0).all()
    # the untouched columns are copies of two distinct honest rows
    originals = {tuple(r) for r in x[:, [0, 1, 4]].tolist()}
    copies = [tuple(r) for r in px[4:, [0, 1, 4]].tolist()]
    assert set(copies) <= originals and len(set(copies)) == 2


def test_add_trigger_refuses_missing_columns() -> None:
    with pytest.raises(ConfigError, match="do not exist"):
        add_trigger(np.zeros((2, 3), dtype=np.float32))


def test_scaled_update_is_clipped_back_to_the_bound_before_signing() -> None:
    honest = _result(_delta(3.0, 4.0))  # ‖Δ‖ = 5
    out = parse_attack("scale:100").run(
        lambda x, y: honest, np.zeros((4, 2)), np.zeros(4), 10.0, np.random.default_rng(0)
    )
    assert out.update_norm == pytest.approx(10.0, rel=1e-5)
    assert out.delta["w"].tolist() == pytest.approx([6.0, 8.0], rel=1e-5)
    assert np.allclose(out.weights["w"], 1.0 + out.delta["w"])


def test_unclipped_scale_keeps_its_full_norm() -> None:
    honest = _result(_delta(3.0, 4.0))
    out = parse_attack("scale_unclipped:100").run(
        lambda x, y: honest, np.zeros((4, 2)), np.zeros(4), 10.0, np.random.default_rng(0)
    )
    assert out.update_norm == pytest.approx(500.0)


def test_data_attack_trains_on_the_poisoned_rows() -> None:
    seen: list[np.ndarray] = []

    def train(x: np.ndarray, y: np.ndarray) -> TrainResult:
        seen.append(y)
        return _result(_delta(1.0, 0.0))

    y = np.array([0.0, 1.0, 1.0, 1.0], dtype=np.float32)
    out = parse_attack("label_flip").run(
        train, np.zeros((4, 5), dtype=np.float32), y, 10.0, np.random.default_rng(0)
    )
    assert seen[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.delta["w"].tolist() == [1.0, 0.0]  # the update itself is the honest one


def test_parse_attack_reads_name_and_parameter() -> None:
    assert sorted(ATTACKS) == [
        "alie", "backdoor", "ipm", "label_flip", "noise", "scale", "scale_unclipped", "sign_flip",
    ]  # fmt: skip
    attack = parse_attack("noise:0.25")
    assert attack.describe() == {"attack": "noise", "level": "update", "std": 0.25}
    assert parse_attack("scale").describe()["factor"] == 10.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("poison", "unknown attack 'poison'"),
        ("scale:ten", "not a finite number"),
        ("scale:inf", "not a finite number"),
        ("sign_flip:2", "takes no parameter"),
    ],
)
def test_parse_attack_refuses_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_attack(text)


def test_flat_norm_spans_every_array() -> None:
    assert flat_norm({"a": np.array([3.0]), "b": np.array([4.0])}) == math.sqrt(25.0)


# -- the worker's call site --------------------------------------------------------------------


class _Weights:
    """The one HubClient call `_local_update` makes: the round's base model."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def model_weights(self, version: str) -> bytes:
        return self.blob


def _worker_update(attack: str | None, update_norm: float = 10.0) -> TrainResult:
    """One `_local_update` of full-batch SGD without DP: the same Δ whatever the seed."""
    from aipipe.models import build_model, weights_to_arrays
    from aipipe.node.worker import NodeWorker
    from aipipe.study.features import FeatureMatrix
    from aipipe.study.preprocessing import Preprocessor
    from aipipe.study.spec import load_study
    from aipipe.wire import RoundWork
    from aipipe.wire.tensors import encode_arrays
    from tests.e2e_support import EXAMPLE_STUDY

    spec = load_study(EXAMPLE_STUDY)
    spec = spec.model_copy(
        update={
            "privacy": spec.privacy.model_copy(update={"mode": "none"}),
            "training": spec.training.model_copy(update={"batch_size": 64, "local_steps": 3}),
            "bounds": spec.bounds.model_copy(update={"update_norm": update_norm}),
        }
    )
    columns = spec.columns()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, len(columns)))
    y = (rng.random(64) > 0.5).astype(np.float64)
    matrix = FeatureMatrix(columns, x, y, x, y, [], [], 64, Preprocessor({}, None, None))
    blob = encode_arrays(weights_to_arrays(build_model(spec.model, len(columns), seed=0)))
    client: Any = _Weights(blob)
    worker = NodeWorker("h1", store=None, client=client, identity=None, audit=None)  # type: ignore[arg-type]
    worker.attack = parse_attack(attack) if attack else None
    item = RoundWork(
        kind="train", study=spec.name, round=1, version="0" * 64, study_digest="0" * 64
    )
    return worker._local_update(spec, item, matrix, sigma=None)


def test_a_sign_flipping_worker_sends_minus_its_honest_update() -> None:
    honest, flipped = _worker_update(None), _worker_update("sign_flip")
    assert honest.update_norm > 0.01
    for key in honest.delta:
        np.testing.assert_allclose(flipped.delta[key], -honest.delta[key], atol=1e-6)
        start = honest.weights[key] - honest.delta[key]
        np.testing.assert_allclose(flipped.weights[key], start + flipped.delta[key], atol=1e-6)


def test_a_scaling_worker_still_clips_to_the_bound_unless_it_skips_its_clip() -> None:
    honest = _worker_update(None, update_norm=1e6)
    bound = honest.update_norm * 3  # ×100 would be 100 times the honest norm
    clipped = _worker_update("scale:100", update_norm=bound)
    assert clipped.update_norm == pytest.approx(bound, rel=1e-5)
    unclipped = _worker_update("scale_unclipped:100", update_norm=bound)
    assert unclipped.update_norm == pytest.approx(100 * honest.update_norm, rel=1e-4)
