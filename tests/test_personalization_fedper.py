"""FedPer's update rule (`aipipe.personalization.fedper`): the body is federated, the head is
the site's own; under DP the head moves only inside the DP-SGD steps that make the update."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch import nn

from aipipe.errors import StudyError
from aipipe.models import arrays_to_model, weights_to_arrays
from aipipe.models.training import evaluate
from aipipe.personalization import PERSONALIZERS, SiteData, personalizer_for
from aipipe.personalization.fedper import FedPer
from aipipe.privacy.dpsgd import DPSGD
from aipipe.study.blocks import ModelSpec, Privacy, Training
from aipipe.study.personal import Personalization
from aipipe.study.spec import StudySpec, load_study, parse_study

HEART = Path(__file__).resolve().parents[1] / "examples" / "heart-disease"
MLP = ModelSpec(kind="mlp", hidden=[8])
TRAINING = Training(rounds=3, local_steps=10, batch_size=16, lr=0.05)
DP = Privacy(mode="dp", clip=1.0, epsilon=5.0, accountant="rdp")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def fedper(privacy: Privacy) -> FedPer:
    settings = Personalization(method="fedper")
    return FedPer(model=MLP, settings=settings, training=TRAINING, privacy=privacy)


def site(n: int = 200, d: int = 5, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) > 0).astype(np.float32)
    return SiteData(x[:160], y[:160], x[160:], y[160:])


def head_of(model: nn.Module) -> np.ndarray:
    return np.array(model.state_dict()["head.weight"].numpy(), copy=True)


def heart_spec(**model: object) -> StudySpec:
    spec = load_study(HEART / "study.yaml")
    return spec.model_copy(
        update={
            "personalization": Personalization(method="fedper"),
            "model": ModelSpec.model_validate(model),
        }
    )


def test_fedper_is_registered_and_shares_only_the_body() -> None:
    assert PERSONALIZERS["fedper"] is FedPer
    method = fedper(Privacy(mode="none"))
    model = method.build(5, seed=0)
    assert method.shared(model) == ["body.0.weight", "body.0.bias"]
    assert method.local(model) == ["head.weight", "head.bias"]
    assert not FedPer.global_predicts


def test_a_round_sends_the_body_and_keeps_the_head() -> None:
    method = fedper(Privacy(mode="none"))
    model = method.build(5, seed=0)
    start = weights_to_arrays(model)

    out = method.train_round(model, {}, site(), noise_multiplier=None, seed=1)

    assert sorted(out.result.delta) == ["body.0.bias", "body.0.weight"]
    assert sorted(out.result.weights) == ["body.0.bias", "body.0.weight"]
    assert sorted(out.state) == ["head.bias", "head.weight"]
    assert not np.allclose(out.state["head.weight"], start["head.weight"])  # the head trained
    norm = np.sqrt(sum(float(np.square(d).sum()) for d in out.result.delta.values()))
    assert out.result.update_norm == pytest.approx(norm)


def test_the_next_round_starts_from_the_kept_head() -> None:
    method = fedper(Privacy(mode="none"))
    first = method.train_round(method.build(5, seed=0), {}, site(), noise_multiplier=None, seed=1)
    # Zero steps of training would leave the head where the round starts: train with lr → 0.
    still = FedPer(
        model=MLP,
        settings=Personalization(method="fedper"),
        training=TRAINING.model_copy(update={"lr": 1e-12}),
        privacy=Privacy(mode="none"),
    )
    second = still.train_round(
        still.build(5, seed=0), first.state, site(), noise_multiplier=None, seed=2
    )
    for name, value in first.state.items():
        np.testing.assert_allclose(second.state[name], value, atol=1e-9)


def test_under_dp_the_head_moves_only_inside_the_dp_sgd_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    method = fedper(DP)
    model = method.build(5, seed=0)
    state = {k: v + 0.5 for k, v in weights_to_arrays(model, part="head").items()}
    heads: list[tuple[np.ndarray, np.ndarray]] = []  # (before, after) each DP-SGD step
    real_step = DPSGD.step

    def spied(self: DPSGD, *args: object, **kwargs: object) -> object:
        before = head_of(model)
        out = real_step(self, *args, **kwargs)  # type: ignore[arg-type]
        heads.append((before, head_of(model)))
        return out

    monkeypatch.setattr(DPSGD, "step", spied)
    out = method.train_round(model, state, site(), noise_multiplier=1.0, seed=3)

    assert len(heads) == TRAINING.local_steps
    np.testing.assert_array_equal(heads[0][0], state["head.weight"])  # starts from the state
    for (_, after), (before, _) in itertools.pairwise(heads):
        np.testing.assert_array_equal(after, before)  # nothing moves it between steps
    np.testing.assert_array_equal(out.state["head.weight"], heads[-1][1])  # nor after them
    assert not np.array_equal(heads[-1][1], heads[0][0])  # the steps did move it
    assert sorted(out.result.delta) == ["body.0.bias", "body.0.weight"]
    assert out.result.epsilon_round is not None


def test_a_logistic_model_has_no_body_to_federate() -> None:
    raw = heart_spec(kind="mlp", hidden=[8]).model_dump(mode="json")
    assert isinstance(personalizer_for(parse_study(yaml.safe_dump(raw))), FedPer)
    raw["model"] = {"kind": "logistic"}
    with pytest.raises(StudyError, match=r"kind: mlp with hidden layers"):
        parse_study(yaml.safe_dump(raw))


def test_the_global_model_keeps_its_head_at_the_seeded_init() -> None:
    """The hub's version 0 holds every tensor; a node loads it whole, then its own head."""
    spec = heart_spec(kind="mlp", hidden=[8])
    method = personalizer_for(spec)
    n = len(spec.columns())
    v0 = weights_to_arrays(method.build(n, seed=0))
    assert set(v0) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}
    again = arrays_to_model(v0, method.build(n))
    assert all(np.array_equal(a, v0[k]) for k, a in weights_to_arrays(again).items())


def test_personalize_refines_the_head_only_with_the_body_as_published() -> None:
    method = fedper(DP)
    model = method.build(5, seed=0)
    body = {k: v for k, v in weights_to_arrays(model).items() if k.startswith("body.")}
    state = method.train_round(model, {}, site(), noise_multiplier=3.0, seed=1).state
    published = method.build(5, seed=0)  # the hub's version: this body, its seeded head

    personal = method.personalize(published, state, {}, site(), seed=2)

    for name, value in body.items():
        np.testing.assert_array_equal(personal.weights[name], value)
    steps = personal.chosen["steps"]
    assert steps in (0.0, 5.0, 10.0, 15.0, 20.0)
    if steps > 0:  # refined without noise from the DP head, and the state is not written back
        assert not np.allclose(personal.weights["head.weight"], state["head.weight"])
    else:
        np.testing.assert_array_equal(personal.weights["head.weight"], state["head.weight"])


def test_refining_a_noisy_head_helps_validation() -> None:
    """Under heavy DP noise the trained head is poor; the noise-free refinement on the fit split
    must lower the validation loss, or keep the head as it was (0 steps)."""
    method = fedper(DP)
    state = method.train_round(method.build(5, seed=0), {}, site(), noise_multiplier=8.0,
                               seed=1).state  # fmt: skip
    as_trained = arrays_to_model(state, method.build(5, seed=0), strict=False)
    before = evaluate(as_trained, site().x_val, site().y_val).loss

    personal = method.personalize(method.build(5, seed=0), state, {}, site(), seed=2)

    assert personal.validation.loss <= before
    assert personal.chosen["steps"] > 0
