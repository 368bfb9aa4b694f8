"""Study models (body + head) and their safe serialization."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from aipipe.errors import StudyError
from aipipe.models import (
    ModelFormatError,
    ModelMismatchError,
    SplitModel,
    arrays_to_model,
    build_model,
    weights_to_arrays,
)
from aipipe.study.blocks import ModelSpec
from aipipe.wire.tensors import TensorDecodeError, arrays_digest, decode_arrays, encode_arrays

LOGISTIC = ModelSpec(kind="logistic")
MLP = ModelSpec(kind="mlp", hidden=[8, 4])


def test_logistic_model_is_an_identity_body_and_a_linear_head() -> None:
    model = build_model(LOGISTIC, 13)

    assert isinstance(model.body, nn.Identity)
    assert (model.head.in_features, model.head.out_features) == (13, 1)
    assert model(torch.zeros(5, 13)).shape == (5, 1)


def test_mlp_body_stacks_linear_relu_per_hidden_width() -> None:
    model = build_model(MLP, 6)

    widths = [(m.in_features, m.out_features) for m in model.body if isinstance(m, nn.Linear)]
    assert widths == [(6, 8), (8, 4)]
    assert sum(isinstance(m, nn.ReLU) for m in model.body) == 2
    assert (model.head.in_features, model.head.out_features) == (4, 1)


@pytest.mark.parametrize(
    "spec", [ModelSpec(kind="logistic", hidden=[4]), ModelSpec(kind="mlp", hidden=[])]
)
def test_model_kind_and_hidden_layers_must_agree(spec: ModelSpec) -> None:
    with pytest.raises(StudyError, match="hidden layer"):
        build_model(spec, 3)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)

    first = weights_to_arrays(build_model(MLP, 5, seed=7))
    second = weights_to_arrays(build_model(MLP, 5, seed=7))

    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.rand(1), expected_next)


def test_weights_to_arrays_copies_so_later_training_cannot_change_them() -> None:
    model = build_model(LOGISTIC, 3, seed=1)
    arrays = weights_to_arrays(model)
    before = arrays["head.weight"].copy()

    with torch.no_grad():
        model.head.weight.add_(1.0)

    assert np.array_equal(arrays["head.weight"], before)


def test_weights_to_arrays_selects_the_fedper_body_or_head() -> None:
    model = build_model(MLP, 5)

    assert set(weights_to_arrays(model, part="body")) == {
        "body.0.weight",
        "body.0.bias",
        "body.2.weight",
        "body.2.bias",
    }
    assert set(weights_to_arrays(model, part="head")) == {"head.weight", "head.bias"}


def test_safetensors_round_trip_preserves_names_shapes_and_values() -> None:
    arrays = weights_to_arrays(build_model(MLP, 5, seed=3))

    restored = decode_arrays(encode_arrays(arrays))

    assert set(restored) == set(arrays)
    for name, array in arrays.items():
        assert restored[name].dtype == array.dtype
        assert np.array_equal(restored[name], array)


def test_strided_views_serialize_their_values_not_their_base_buffer() -> None:
    base = np.arange(8, dtype=np.float32)

    restored = decode_arrays(encode_arrays({"w": base[::2]}))

    assert np.array_equal(restored["w"], [0.0, 2.0, 4.0, 6.0])


def test_garbage_bytes_are_refused_as_a_format_error() -> None:
    with pytest.raises(TensorDecodeError, match="not a safetensors"):
        decode_arrays(b"\x80\x04not-safetensors")


def test_digest_ignores_key_order_and_is_sha256_of_the_canonical_bytes() -> None:
    arrays = weights_to_arrays(build_model(MLP, 5, seed=3))
    reordered = dict(reversed(list(arrays.items())))

    assert arrays_digest(reordered) == arrays_digest(arrays)
    assert arrays_digest(arrays) == hashlib.sha256(encode_arrays(arrays)).hexdigest()


def test_digest_changes_when_one_weight_changes() -> None:
    arrays = weights_to_arrays(build_model(LOGISTIC, 3, seed=3))
    changed = {k: v.copy() for k, v in arrays.items()}
    changed["head.bias"][0] += 1e-6

    assert arrays_digest(changed) != arrays_digest(arrays)


def test_arrays_load_into_a_fresh_model_with_identical_outputs() -> None:
    source = build_model(MLP, 5, seed=1)
    target = build_model(MLP, 5, seed=2)
    x = torch.randn(4, 5)

    arrays_to_model(weights_to_arrays(source), target)

    assert torch.equal(target(x), source(x))


def test_partial_load_keeps_the_local_head() -> None:
    global_model = build_model(MLP, 5, seed=1)
    local = build_model(MLP, 5, seed=2)
    head_before = local.head.weight.detach().clone()

    arrays_to_model(weights_to_arrays(global_model, part="body"), local, strict=False)

    assert torch.equal(local.head.weight, head_before)
    assert torch.equal(local.body[0].weight, global_model.body[0].weight)


def test_missing_tensors_are_refused_when_strict() -> None:
    body_only = weights_to_arrays(build_model(MLP, 5), part="body")

    with pytest.raises(ModelMismatchError, match=r"lack tensors.*head\.bias"):
        arrays_to_model(body_only, build_model(MLP, 5))


def test_wrong_shapes_are_refused() -> None:
    arrays = weights_to_arrays(build_model(LOGISTIC, 4))

    with pytest.raises(ModelMismatchError, match=r"'head.weight' has shape \(1, 4\)"):
        arrays_to_model(arrays, build_model(LOGISTIC, 5))


def test_unknown_tensor_names_are_refused() -> None:
    arrays = weights_to_arrays(build_model(LOGISTIC, 4))
    arrays["body.evil"] = np.zeros(1, dtype=np.float32)

    with pytest.raises(ModelMismatchError, match=r"body\.evil"):
        arrays_to_model(arrays, build_model(LOGISTIC, 4), strict=False)


def test_non_finite_weights_are_refused_before_any_tensor_changes() -> None:
    model: SplitModel = build_model(LOGISTIC, 2, seed=0)
    before = weights_to_arrays(model)
    arrays = {k: v.copy() for k, v in before.items()}
    arrays["head.weight"][0, 1] = np.nan

    with pytest.raises(ModelFormatError, match="NaN"):
        arrays_to_model(arrays, model)
    assert np.array_equal(weights_to_arrays(model)["head.bias"], before["head.bias"])
