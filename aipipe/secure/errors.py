"""Errors of secure aggregation (fixed point, SecAgg+, CKKS, sealed boxes), named after the failure.

AipipeError
└── SecureAggregationError        secure aggregation cannot go on
    ├── FixedPointRangeError      a value outside ±clip, or more summands than the scale allows
    ├── SecAggProtocolError       a SecAgg+ message refused: unsigned, reused key, wrong round,
    │   │                         wrong length, share that does not decrypt, out of order
    │   └── UnmaskRefusedError    the server asked to unmask one neighbour both ways
    ├── SecAggRoundFailedError    fewer than t survivors or shares, or shares that rebuild no
    │                             secret (corrupt): the sum cannot be recovered
    ├── CkksContextError          a ciphertext from another context, a public context asked to
    │                             decrypt, parameters below 128-bit security
    └── SealedBoxError            a sealed secret that does not open for this recipient
"""

from __future__ import annotations

from aipipe.errors import AipipeError


class SecureAggregationError(AipipeError):
    """Secure aggregation cannot go on; the message says which step and why."""

    exit_code = 16


class FixedPointRangeError(SecureAggregationError):
    """A value outside ±clip (the caller clips first), or a sum of more than `n_max` vectors."""


class SecAggProtocolError(SecureAggregationError):
    """A SecAgg+ message that the receiving state machine refuses."""


class UnmaskRefusedError(SecAggProtocolError):
    """The server asked for both the mask-seed share and the key share of one neighbour.

    Revealing both would let the server strip every mask off that neighbour's input
    (Bonawitz et al. 2017, the Unmasking round), so an honest client refuses.
    """


class SecAggRoundFailedError(SecureAggregationError):
    """Too many clients dropped (fewer than t shares survive for some secret), or the shares
    revealed for a secret are corrupt."""


class CkksContextError(SecureAggregationError):
    """A CKKS context or ciphertext that cannot be used here."""


class SealedBoxError(SecureAggregationError):
    """A sealed blob that does not open: wrong recipient, study, sender or tampered bytes."""
