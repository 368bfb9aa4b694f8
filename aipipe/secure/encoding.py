"""What a node puts inside a masked or encrypted update, and how the hub reads the sum back.

A node's contribution is one flat float64 vector

    x = [r, r·clip(Δ)]     r = min(n, max_examples) / max_examples ∈ (0, 1]

with Δ the model delta flattened in sorted parameter-name order and clip(Δ) its projection on
the L2 ball of radius `update_clip` (post-processing, so DP guarantees are untouched). Every
coordinate lies in ±max(1, update_clip): the range the fixed-point codec and the CKKS
parameters are sized for. The hub gets only Σx over the contributors, from which

    mean Δ = Σ r·Δ / Σ r       (the FedAvg mean, McMahan et al. 2017, with weights r ∝ n)

and Σn ≈ Σr · max_examples. Sites larger than `max_examples` weigh as `max_examples` (the cap
keeps r ≤ 1, as Flower's SecAgg+ `max_weight` does). A node's own n never leaves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.fixedpoint import Bits, FixedPointCodec

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class UpdateLayout:
    """The model's parameter names and shapes, in the order they are flattened."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, weights: Mapping[str, npt.NDArray[Any]]) -> UpdateLayout:
        return cls(tuple((k, tuple(weights[k].shape)) for k in sorted(weights)))

    @property
    def size(self) -> int:
        """Length of a contribution vector: one weight slot plus every parameter."""
        return 1 + sum(int(np.prod(shape)) for _, shape in self.shapes)


def value_range(update_clip: float) -> float:
    """The largest |coordinate| of a contribution: r ≤ 1 and |r·Δ_j| ≤ ‖Δ‖ ≤ update_clip."""
    return max(1.0, update_clip)


def fixed_point_codec(update_clip: float, n_max: int, bits: int) -> FixedPointCodec:
    """The SecAgg+ codec every node and the hub derive alike from the study and the round."""
    width: Bits = 64 if bits == 64 else 32
    return FixedPointCodec(clip=value_range(update_clip), n_max=n_max, bits=width)


def contribution(
    delta: Mapping[str, npt.NDArray[Any]],
    num_examples: int,
    *,
    layout: UpdateLayout,
    update_clip: float,
    max_examples: int,
) -> FloatArray:
    """x = [r, r·clip(Δ)] for one node."""
    if set(delta) != {name for name, _ in layout.shapes}:
        raise SecureAggregationError("update parameters do not match the model's")
    flat = np.concatenate(
        [np.asarray(delta[name], dtype=np.float64).ravel() for name, _ in layout.shapes]
    )
    norm = float(np.linalg.norm(flat))
    if not np.isfinite(norm):
        raise SecureAggregationError("update holds NaN or infinity")
    if norm > update_clip:
        flat *= update_clip / norm
    r = min(num_examples, max_examples) / max_examples
    return np.concatenate([[r], r * flat])


def check_sum(total: FloatArray, count: int, update_clip: float, tolerance: float) -> None:
    """Refuse a sum that `count` valid contributions cannot make: 0 < Σr ≤ n and every
    |Σx_j| ≤ n · max(1, update_clip) (up to `tolerance`, the mode's decoding error).

    Masking and encryption hide each input, so the hub cannot check one; a malformed input
    (a word outside the codec's range, a ciphertext of unclipped values) shows here, in the
    sum, and the round fails instead of publishing a model built from it.
    """
    weight = float(total[0]) if total.size else 0.0
    largest = float(np.max(np.abs(total))) if total.size else 0.0
    bound = count * value_range(update_clip) + tolerance
    if not (np.all(np.isfinite(total)) and 0 < weight <= count + tolerance and largest <= bound):
        raise SecureAggregationError(
            f"the sum of {count} contributions is outside what clipped inputs can add up to "
            f"(Σr = {weight:.6g}, max |Σx| = {largest:.6g}, bound {bound:.6g}); a node sent a "
            "malformed input, so no model is published from it"
        )


def mean_from_sum(
    total: FloatArray, *, layout: UpdateLayout, max_examples: int
) -> tuple[dict[str, FloatArray], int]:
    """(Σ n·Δ in the aggregators' convention, Σ n) from the decoded Σx of the contributors.

    The aggregators take a sample-weighted sum and its total count (`Aggregator.from_sum`);
    Σr·Δ · (N / Σr) with N = round(Σr · max_examples) has the same mean Σr·Δ / Σr.
    """
    if total.shape != (layout.size,):
        raise SecureAggregationError(f"sum has {total.size} values; this model takes {layout.size}")
    weight = float(total[0])
    examples = round(weight * max_examples)
    if not np.all(np.isfinite(total)) or examples < 1:
        raise SecureAggregationError(f"sum carries no usable weight (Σr = {weight:.6g})")
    scaled = total[1:] * (examples / weight)
    out: dict[str, FloatArray] = {}
    offset = 0
    for name, shape in layout.shapes:
        size = int(np.prod(shape))
        out[name] = scaled[offset : offset + size].reshape(shape)
        offset += size
    return out, examples
