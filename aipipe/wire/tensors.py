"""Tensors on the wire and at rest: safetensors bytes of named numpy arrays, never pickle.

safetensors stores a JSON header and raw little-endian buffers, so decoding runs no code from
the sender. Keys are sorted by the format, which makes the bytes of equal dicts equal: the
sha256 of these bytes is a model's content address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load, save

from aipipe.errors import WireDecodeError

Arrays = dict[str, npt.NDArray[Any]]
_ALLOWED = (np.dtype(np.float32), np.dtype(np.float64))


class TensorDecodeError(WireDecodeError, ValueError):
    """Bytes that are not a safetensors blob of float arrays (a `ValueError` too, as before)."""


def encode_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """Equal dicts give equal bytes whatever their key order."""
    # safetensors.numpy writes the raw buffer of a non-contiguous view (a strided slice comes
    # out as its base's first bytes), so arrays are made contiguous and little-endian first.
    return save(
        {
            key: np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            for key, value in sorted(arrays.items())
        }
    )


def decode_arrays(data: bytes) -> Arrays:
    try:
        arrays = load(data)
    except (SafetensorError, ValueError) as exc:
        raise TensorDecodeError(f"not a safetensors blob: {exc}") from exc
    for key, value in arrays.items():
        if value.dtype not in _ALLOWED:
            raise TensorDecodeError(f"tensor '{key}' has dtype {value.dtype}; expected float")
    return arrays


def arrays_digest(arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    """sha256 (hex) of the canonical bytes: the content address of a set of weights."""
    return hashlib.sha256(encode_arrays(arrays)).hexdigest()
