"""The personalization methods' update rules (issue 13) on small seeded synthetic data:
`finetune` (FLamby's FedAvgFineTuning), `fenda` (FENDA-FL) and `ditto` (Li et al. 2021), their
shared checkpoint selection on validation, and the registry."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from aipipe.errors import StudyError
from aipipe.models import FendaModel, arrays_to_model, build_model, weights_to_arrays
from aipipe.models.serialization import Arrays
from aipipe.models.training import evaluate, train_local
from aipipe.personalization import PERSONALIZERS, SiteData
from aipipe.personalization.base import NO_DP, Personalizer
from aipipe.personalization.ditto import Ditto
from aipipe.personalization.fenda import Fenda
from aipipe.personalization.finetune import FineTuning
from aipipe.personalization.selection import checkpoints
from aipipe.privacy.clipping import PerSampleClipper
from aipipe.study.blocks import ModelSpec, Privacy, Training
from aipipe.study.personal import METHODS, Personalization
from aipipe.study.spec import parse_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

D = 5
MLP = ModelSpec(kind="mlp", hidden=[8])
TRAINING = Training(rounds=2, local_steps=10, batch_size=16, lr=0.05)
DP = Privacy(mode="dp", clip=1.0, accountant="rdp")
RULE = np.array([1.0, -2.0, 0.5, 1.5, -1.0])


def rows(n: int, seed: int, *, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n rows labelled by the sign of RULE·x (the opposite label with `flip`)."""
    x = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    y = (x @ RULE > 0).astype(np.float32)
    return x, (1 - y if flip else y)


def site(*, fit_flip: bool = False, val_flip: bool = False) -> SiteData:
    x_fit, y_fit = rows(120, 1, flip=fit_flip)
    x_val, y_val = rows(60, 2, flip=val_flip)
    return SiteData(x_fit=x_fit, y_fit=y_fit, x_val=x_val, y_val=y_val)


def method(
    cls: type[Personalizer], *, model: ModelSpec = MLP, privacy: Privacy = NO_DP, **block: Any
) -> Personalizer:
    settings = Personalization.model_validate(
        {"method": cls.name, "steps": 20, "lr": 0.05, **block}
    )
    return cls(model=model, settings=settings, training=TRAINING, privacy=privacy)


def assert_same(a: Arrays, b: Arrays) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def changed(a: Arrays, b: Arrays) -> bool:
    return any(not np.array_equal(a[name], b[name]) for name in a)


def replay(
    personalizer: Personalizer, start: Arrays, data: SiteData, steps: int
) -> torch.nn.Module:
    """`steps` plain local steps (seed 3, the personalize calls' seed) from `start`, by hand."""
    model = arrays_to_model(start, personalizer.build(D, seed=0))
    if steps:
        local = personalizer.local_training().model_copy(update={"local_steps": steps})
        train_local(
            model,
            data.x_fit,
            data.y_fit,
            training=local,
            privacy=NO_DP,
            noise_multiplier=None,
            seed=3,
        )
    return model


# -- checkpoint selection (shared by all three) --------------------------------------------


def test_checkpoints_are_zero_and_every_quarter_of_the_steps() -> None:
    assert checkpoints(20) == [0, 5, 10, 15, 20]
    assert checkpoints(10) == [0, 2, 5, 7, 10]
    assert checkpoints(1) == [0, 1]


def test_personalizers_are_given_no_test_split() -> None:
    assert {f.name for f in fields(SiteData)} == {"x_fit", "y_fit", "x_val", "y_val"}


# -- finetune --------------------------------------------------------------------------------


def test_finetune_shares_every_parameter_and_predicts_with_the_global_model() -> None:
    finetune = method(FineTuning)
    model = finetune.build(D, seed=0)

    assert finetune.shared(model) == list(model.state_dict())
    assert finetune.local(model) == []
    assert finetune.global_predicts


def test_finetune_steps_when_local_training_helps_validation() -> None:
    finetune, data = method(FineTuning), site()
    model = finetune.build(D, seed=0)
    start = weights_to_arrays(model)
    global_loss = evaluate(model, data.x_val, data.y_val).loss

    personal = finetune.personalize(model, {}, {}, data, seed=3)

    assert personal.chosen["steps"] > 0
    assert personal.validation.loss < global_loss
    assert personal.validation == evaluate(model, data.x_val, data.y_val)
    # The chosen checkpoint is exactly that many plain steps from the global weights.
    chosen = replay(finetune, start, data, int(personal.chosen["steps"]))
    assert_same(personal.weights, weights_to_arrays(chosen))


def test_finetune_keeps_the_global_model_when_local_training_only_hurts_validation() -> None:
    # Same fit split and start as above; the validation labels are flipped, so every step
    # fitted to the fit split raises the validation loss: 0 steps, the global model, wins.
    finetune, data = method(FineTuning), site(val_flip=True)
    model = finetune.build(D, seed=0)
    global_weights = weights_to_arrays(model)

    personal = finetune.personalize(model, {}, {}, data, seed=3)

    assert personal.chosen == {"steps": 0}
    assert_same(personal.weights, global_weights)
    assert personal.validation == evaluate(model, data.x_val, data.y_val)


def test_finetune_chooses_the_checkpoint_with_the_lowest_validation_loss() -> None:
    finetune, data = method(FineTuning), site()
    start = weights_to_arrays(finetune.build(D, seed=0))
    losses = {}
    for k in checkpoints(20):  # each checkpoint replayed on its own: k steps from the start
        losses[k] = evaluate(replay(finetune, start, data, k), data.x_val, data.y_val).loss

    personal = finetune.personalize(finetune.build(D, seed=0), {}, {}, data, seed=3)

    assert personal.chosen == {"steps": min(losses, key=losses.__getitem__)}
    assert personal.validation.loss == pytest.approx(min(losses.values()), rel=1e-6)


def test_an_empty_validation_split_is_refused() -> None:
    data = site()
    empty = SiteData(x_fit=data.x_fit, y_fit=data.y_fit, x_val=data.x_val[:0], y_val=data.y_val[:0])
    finetune = method(FineTuning)
    with pytest.raises(ValueError, match="validation split is empty"):
        finetune.personalize(finetune.build(D, seed=0), {}, {}, empty, seed=3)


def test_finetune_is_deterministic_given_the_seed() -> None:
    finetune, data = method(FineTuning), site()
    first = finetune.personalize(finetune.build(D, seed=0), {}, {}, data, seed=5)
    again = finetune.personalize(finetune.build(D, seed=0), {}, {}, data, seed=5)

    assert first.chosen == again.chosen
    assert_same(first.weights, again.weights)


# -- fenda -----------------------------------------------------------------------------------


def fenda_parts(fenda: Personalizer, model: torch.nn.Module) -> tuple[list[str], list[str]]:
    return fenda.shared(model), fenda.local(model)


def test_fenda_shares_exactly_the_global_extractor() -> None:
    fenda = method(Fenda, local_hidden=[3])
    model = fenda.build(D, seed=0)

    shared, local = fenda_parts(fenda, model)

    assert isinstance(model, FendaModel)
    assert shared == ["global_extractor.0.weight", "global_extractor.0.bias"]
    assert local == [
        "local_extractor.0.weight",
        "local_extractor.0.bias",
        "head.weight",
        "head.bias",
    ]
    assert model.state_dict()["head.weight"].shape == (1, 8 + 3)
    assert not fenda.global_predicts


def test_fenda_forward_concatenates_both_extractors_into_the_head() -> None:
    model = method(Fenda, local_hidden=[3]).build(D, seed=0)
    assert isinstance(model, FendaModel)
    x = torch.randn(4, D)

    features = torch.cat([model.global_extractor(x), model.local_extractor(x)], dim=1)

    torch.testing.assert_close(model(x), features @ model.head.weight.T + model.head.bias)


def test_fenda_round_sends_only_the_global_extractor_and_trains_the_local_state() -> None:
    fenda, data = method(Fenda), site()
    model = fenda.build(D, seed=0)
    shared, local = fenda_parts(fenda, model)
    before = weights_to_arrays(model)

    out = fenda.train_round(model, {}, data, noise_multiplier=None, seed=1)

    assert sorted(out.result.delta) == sorted(shared)
    assert sorted(out.result.weights) == sorted(shared)
    assert sorted(out.state) == sorted(local)
    assert changed(out.state, {name: before[name] for name in local})
    assert changed(out.result.delta, {name: 0 * before[name] for name in shared})


def test_fenda_personalize_keeps_the_hub_visible_weights_and_leaves_the_state_alone() -> None:
    fenda, data = method(Fenda), site()
    model = fenda.build(D, seed=0)
    state = fenda.train_round(model, {}, data, noise_multiplier=None, seed=1).state
    global_model = fenda.build(D, seed=7)  # the next version: other global weights
    global_weights = weights_to_arrays(global_model)
    shared = fenda.shared(global_model)
    state_copy = {name: array.copy() for name, array in state.items()}

    personal = fenda.personalize(global_model, state, {}, data, seed=2)

    assert_same({n: personal.weights[n] for n in shared}, {n: global_weights[n] for n in shared})
    assert_same(state, state_copy)  # the refinement is the personal model's, not the state's
    assert all(p.requires_grad for p in global_model.parameters())
    assert personal.chosen["steps"] > 0  # the local head fits the site: refining helps here
    assert personal.validation.accuracy > 0.8


def test_fenda_personalize_keeps_the_state_as_it_is_when_refining_only_hurts() -> None:
    fenda = method(Fenda)
    model = fenda.build(D, seed=0)
    state = fenda.train_round(model, {}, site(), noise_multiplier=None, seed=1).state

    personal = fenda.personalize(model, state, {}, site(val_flip=True), seed=2)

    assert personal.chosen == {"steps": 0}
    assert_same({name: personal.weights[name] for name in state}, state)


def test_fenda_dp_round_runs_and_changes_the_local_state_only_inside_it() -> None:
    fenda, data = method(Fenda, privacy=DP), site()
    model = fenda.build(D, seed=0)
    state = {name: weights_to_arrays(model)[name] for name in fenda.local(model)}

    out = fenda.train_round(model, state, data, noise_multiplier=1.0, seed=1)

    assert out.result.epsilon_round is not None and out.result.noise_multiplier == 1.0
    assert sorted(out.result.delta) == sorted(fenda.shared(model))
    assert changed(out.state, state)
    kept = {name: array.copy() for name, array in out.state.items()}
    fenda.personalize(fenda.build(D, seed=0), out.state, {}, data, seed=2)
    assert_same(out.state, kept)


def test_per_sample_clipping_is_exact_on_a_fenda_model() -> None:
    model = method(Fenda, local_hidden=[3]).build(D, seed=0)
    torch.manual_seed(0)
    x, y = torch.randn(6, D), torch.randint(0, 2, (6,)).float()
    expected = []
    for i in range(len(x)):  # one backward per row: the per-sample gradients by definition
        loss = F.binary_cross_entropy_with_logits(model(x[i : i + 1]).squeeze(1), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(torch.cat([g.flatten() for g in grads]).norm())

    _, norms = PerSampleClipper(model, 1.0).clipped_backward(
        x, lambda out: F.binary_cross_entropy_with_logits(out.squeeze(1), y, reduction="none")
    )

    torch.testing.assert_close(norms, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_fenda_without_hidden_layers_cannot_be_built() -> None:
    fenda = method(Fenda, model=ModelSpec(kind="logistic"))
    with pytest.raises(StudyError, match="kind: mlp"):
        fenda.build(D, seed=0)


# -- ditto -----------------------------------------------------------------------------------


def ditto_run(lam: float, data: SiteData, carry: Arrays | None = None) -> tuple[Any, Arrays]:
    ditto = method(Ditto, lam=lam)
    model = ditto.build(D, seed=0)
    global_weights = weights_to_arrays(model)
    return ditto.personalize(model, {}, carry or {}, data, seed=3), global_weights


def test_ditto_trains_the_global_model_as_without_personalization() -> None:
    ditto, data = method(Ditto), site()
    model, plain = ditto.build(D, seed=0), build_model(MLP, D, seed=0)

    out = ditto.train_round(model, {}, data, noise_multiplier=None, seed=1)
    expected = train_local(
        plain,
        data.x_fit,
        data.y_fit,
        training=TRAINING,
        privacy=NO_DP,
        noise_multiplier=None,
        seed=1,
    )

    assert out.state == {}
    assert_same(out.result.delta, expected.delta)


def test_ditto_with_lambda_zero_is_plain_local_training() -> None:
    data = site()
    personal, global_weights = ditto_run(0.0, data)
    steps = int(personal.chosen["steps"])
    local_training = replay(method(Ditto, lam=0.0), global_weights, data, steps)

    assert steps == 20  # every step helps on this site: the whole run is chosen
    assert_same(personal.weights, weights_to_arrays(local_training))
    assert_same(personal.carry, personal.weights)


def test_ditto_with_a_huge_lambda_stays_at_the_global_model() -> None:
    data = site()
    free, global_weights = ditto_run(0.0, data)
    pinned, _ = ditto_run(1e6, data)

    def farthest(weights: Arrays) -> float:
        return max(float(np.abs(weights[n] - global_weights[n]).max()) for n in global_weights)

    # Adam moves each weight by about lr a step; the proximal term pulls it straight back.
    assert farthest(pinned.weights) <= 3 * 0.05
    assert farthest(free.weights) > 10 * farthest(pinned.weights)


def test_ditto_continues_from_the_previous_personal_model() -> None:
    data = site()
    first, global_weights = ditto_run(0.0, data)
    second, _ = ditto_run(0.0, data, carry=first.carry)
    continued = replay(method(Ditto, lam=0.0), first.carry, data, int(second.chosen["steps"]))

    assert changed(first.carry, global_weights)
    assert_same(second.weights, weights_to_arrays(continued))


def test_ditto_anchors_the_proximal_term_at_the_global_model_not_at_the_previous_v() -> None:
    # The previous v learnt the opposite labels; on this site's data it has far to go.
    first, global_weights = ditto_run(0.0, site(fit_flip=True, val_flip=True))
    data = site()
    second, _ = ditto_run(1.0, data, carry=first.carry)
    ditto = method(Ditto, lam=1.0)
    by_hand = arrays_to_model(first.carry, ditto.build(D, seed=0))
    steps = int(second.chosen["steps"])
    local = ditto.local_training().model_copy(update={"local_steps": steps})

    train_local(
        by_hand,
        data.x_fit,
        data.y_fit,
        training=local,
        privacy=NO_DP,
        noise_multiplier=None,
        global_weights=global_weights,
        proximal_mu=1.0,
        seed=3,
    )

    assert steps > 0
    assert_same(second.weights, weights_to_arrays(by_hand))


def test_ditto_pulls_the_personal_model_toward_the_global_one() -> None:
    # The same start and steps; a larger λ ends nearer to w_global.
    data = site()
    distances = []
    for lam in (0.0, 1.0, 100.0):
        personal, global_weights = ditto_run(lam, data)
        squared = sum(
            float(np.square(personal.weights[n] - global_weights[n]).sum()) for n in global_weights
        )
        distances.append(squared)
    assert distances[0] > distances[1] > distances[2]


# -- registry and study --------------------------------------------------------------------


def test_the_registry_holds_these_methods_and_only_study_methods() -> None:
    assert {"none", "finetune", "fenda", "ditto"} <= set(PERSONALIZERS)
    assert set(PERSONALIZERS) <= set(METHODS)
    # fedper is another module's; once it is registered the two are equal.
    assert set(METHODS) - set(PERSONALIZERS) <= {"fedper"}
    assert all(cls.name == name for name, cls in PERSONALIZERS.items())


STUDY: dict[str, Any] = {
    "name": "tiny",
    "cohort": {"label": {"conditions": ["snomed|44054006"]}},
    "features": [{"name": "glucose", "codes": ["loinc|2339-0"]}],
}


@pytest.mark.parametrize("name", ["fedper", "fenda"])
def test_a_split_method_on_a_logistic_model_is_refused_naming_the_fix(name: str) -> None:
    raw = {**STUDY, "model": {"kind": "logistic"}, "personalization": {"method": name}}

    with pytest.raises(StudyError, match="use model kind: mlp with hidden layers") as caught:
        parse_study(yaml.safe_dump(raw), source="study.yaml")

    assert name in str(caught.value)


@pytest.mark.parametrize("name", ["none", "finetune", "ditto"])
def test_a_whole_model_method_on_a_logistic_model_is_accepted(name: str) -> None:
    raw = {**STUDY, "model": {"kind": "logistic"}, "personalization": {"method": name}}
    assert parse_study(yaml.safe_dump(raw)).personalization is not None


def test_fenda_on_an_mlp_study_is_accepted() -> None:
    raw = {**STUDY, "model": {"kind": "mlp", "hidden": [8]}, "personalization": {"method": "fenda"}}
    assert parse_study(yaml.safe_dump(raw)).model.hidden == [8]
