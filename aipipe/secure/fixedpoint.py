"""Fixed-point codec: clipped float vectors ↔ integers mod 2^k, so that masked sums can wrap safely.

SecAgg+ masks live in Z_{2^k} (Bonawitz et al. 2017 take inputs in Z_R; here R = 2^k with k = 32
or 64, where NumPy's unsigned arithmetic wraps exactly as modular addition). Masks cancel only
mod 2^k, so the *plain* sum of the encoded inputs must itself fit in the signed range, or the
decoded sum wraps silently. The codec therefore picks the scale from (clip, n_max, k):

    encode(x) = round(x · scale) mod 2^k,      x ∈ [-clip, clip] (refused otherwise)
    |Σ_{i≤n} round(x_i · scale)| ≤ n · (clip · scale + 1/2) ≤ L     (L: see below)

with L = 2^31 − 1 for k = 32, and L = 2^53 − 1 for k = 64 (the largest integer that float64
holds exactly, so decoding adds no error beyond quantisation). `scale` is the largest power of two
that satisfies the bound for n_max summands; a power of two makes x · scale and the final division
exact in float64.

Quantisation error: each coordinate is rounded once, |round(x·s) − x·s| ≤ 1/2, so for a sum of n
inputs, per coordinate,

    |decode_sum(Σ encode(x_i), n) − Σ x_i| ≤ n / (2 · scale).

Every node and the hub build the codec from the same (clip, n_max, bits) found in the study, so
they agree on the scale without sending it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from aipipe.secure.errors import FixedPointRangeError

Bits = Literal[32, 64]
UIntArray = npt.NDArray[np.unsignedinteger[Any]]
FloatArray = npt.NDArray[np.float64]

_LIMIT: dict[int, int] = {32: 2**31 - 1, 64: 2**53 - 1}
_UINT: dict[int, type[np.unsignedinteger[Any]]] = {32: np.uint32, 64: np.uint64}
_INT: dict[int, type[np.signedinteger[Any]]] = {32: np.int32, 64: np.int64}


def choose_scale(clip: float, n_max: int, bits: Bits = 32) -> float:
    """Largest power of two s with n_max · (clip · s + 1/2) ≤ L(bits): the sum can never wrap."""
    if not (math.isfinite(clip) and clip > 0):
        raise FixedPointRangeError(f"clip must be a positive finite number, got {clip!r}")
    if n_max < 1:
        raise FixedPointRangeError(f"n_max must be at least 1, got {n_max}")
    if bits not in _LIMIT:
        raise FixedPointRangeError(f"bits must be 32 or 64, got {bits}")
    room = _LIMIT[bits] / n_max - 0.5
    if room <= 0:
        raise FixedPointRangeError(
            f"{n_max} summands cannot fit in {bits}-bit words; use bits=64 or fewer nodes"
        )
    # frexp(v) = (m, e) with v = m·2^e, 0.5 ≤ m < 1, so 2^(e-1) ≤ v: the largest power of two ≤ v.
    _, exponent = math.frexp(room / clip)
    return math.ldexp(1.0, exponent - 1)


@dataclass(frozen=True)
class FixedPointCodec:
    """Encode clipped floats into Z_{2^bits}; decode a sum of at most `n_max` encodings."""

    clip: float
    n_max: int
    bits: Bits = 32
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", choose_scale(self.clip, self.n_max, self.bits))

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        return np.dtype(_UINT[self.bits])

    def error_bound(self, n: int) -> float:
        """Largest |decoded − exact| per coordinate for a sum of n encodings: n / (2 · scale)."""
        return n / (2.0 * self.scale)

    def encode(self, x: npt.ArrayLike) -> UIntArray:
        """round(x · scale) mod 2^bits; values outside ±clip or non-finite are refused."""
        values = np.asarray(x, dtype=np.float64).ravel()
        largest = float(np.max(np.abs(values))) if values.size else 0.0
        if not largest <= self.clip:  # also catches NaN, for which every comparison is False
            bad = ~np.isfinite(values) | (np.abs(values) > self.clip)
            raise FixedPointRangeError(
                f"{int(bad.sum())} of {values.size} values are outside ±{self.clip} "
                f"(largest |x| = {largest:.6g}); clip the update before encoding it"
            )
        # |x · scale| ≤ clip · scale < 2^(bits−1), so the signed cast is exact; viewing its two's
        # complement bits as unsigned is the residue mod 2^bits.
        return np.rint(values * self.scale).astype(_INT[self.bits]).view(_UINT[self.bits])

    def decode_sum(self, y: npt.ArrayLike, n: int) -> FloatArray:
        """The float sum of n inputs from their (unmasked) sum mod 2^bits."""
        if not 1 <= n <= self.n_max:
            raise FixedPointRangeError(
                f"a sum of {n} inputs cannot be decoded by a codec sized for at most "
                f"{self.n_max}; build the codec with n_max ≥ {n}"
            )
        words = np.asarray(y)
        if words.dtype != self.dtype:
            raise FixedPointRangeError(f"expected {self.dtype} words, got {words.dtype}")
        signed = words.view(_INT[self.bits]).astype(np.float64)
        bound = n * (self.clip * self.scale + 0.5)
        if signed.size and float(np.max(np.abs(signed))) > bound:
            # A sum of n valid encodings cannot get here: wrong n, or masks not fully removed.
            raise FixedPointRangeError(
                f"sum exceeds the range of {n} clipped inputs (|s| > {bound:.6g}); "
                "the count is wrong or the sum was not fully unmasked"
            )
        return signed / self.scale
