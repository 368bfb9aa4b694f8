"""Model weights as named NumPy arrays, the common currency between models, aggregation and
the wire. Arrays travel and rest as safetensors bytes (`aipipe.wire.tensors`), never pickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from aipipe.models.errors import ModelFormatError, ModelMismatchError

Arrays = dict[str, np.ndarray]
Part = Literal["all", "body", "head"]


def weights_to_arrays(model: nn.Module, *, part: Part = "all") -> Arrays:
    """Copy a model's weights into arrays; `part` selects the FedPer body or head only."""
    prefix = "" if part == "all" else f"{part}."
    return {
        name: tensor.detach().cpu().numpy().copy()  # a copy: later training must not alter it
        for name, tensor in model.state_dict().items()
        if name.startswith(prefix)
    }


def arrays_to_model(
    arrays: Mapping[str, np.ndarray], model: nn.Module, *, strict: bool = True
) -> nn.Module:
    """Load arrays into `model` in place and return it.

    With `strict=False` tensors missing from `arrays` keep their values, which is how a node loads
    a global body under its personal head. Unknown names, wrong shapes and non-finite values are
    always refused: they mean the arrays belong to another model, or were corrupted.
    """
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    missing = sorted(set(state) - set(arrays))
    if unknown:
        raise ModelMismatchError(f"weights name tensors the model lacks: {', '.join(unknown)}")
    if strict and missing:
        raise ModelMismatchError(f"weights lack tensors the model has: {', '.join(missing)}")
    for name, array in arrays.items():
        target = state[name]
        if tuple(array.shape) != tuple(target.shape):
            raise ModelMismatchError(
                f"tensor '{name}' has shape {tuple(array.shape)}, the model needs "
                f"{tuple(target.shape)}"
            )
        if not np.isfinite(array).all():
            raise ModelFormatError(f"tensor '{name}' holds NaN or infinite values")
    with torch.no_grad():
        for name, array in arrays.items():
            native = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
            state[name].copy_(torch.from_numpy(native))  # copy_ casts to the model's dtype
    return model
