"""The cryptography of SecAgg+, as small pure functions over `cryptography` and Python ints.

- Key agreement: X25519; every shared secret goes through HKDF-SHA256 with a label that names the
  purpose, the round and both parties, so one agreement never yields the same key twice.
- PRG: AES-128-CTR keystream (zero IV; every key is used for one stream only) read as
  little-endian words; ~6–9 GB/s here, 7× NumPy's MT19937 (DESIGN §7).
- Shares: Shamir (1979) t-of-m over the prime field F_p, p = 2^521 − 1: a whole secret (16-byte
  mask seed or 32-byte s key) is one field element, so one polynomial per secret and one
  `SHARE_BYTES`-byte share per holder, share i at x = i + 1; sent under AES-256-GCM keyed from
  the c-key agreement, with (round, sender, receiver) as associated data.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aipipe.errors import SignatureError
from aipipe.secure._framing import frame, hkdf_sha256
from aipipe.secure.errors import SecAggProtocolError, SecAggRoundFailedError
from aipipe.secure.identity import verify_signature
from aipipe.wire.secagg_messages import KeyAdvertisement

UIntArray = npt.NDArray[np.unsignedinteger[Any]]

KEYS_LABEL = b"aipipe/secagg/keys/v1"
_MASK_LABEL = b"aipipe/secagg/mask/v1"
_SHARE_LABEL = b"aipipe/secagg/share/v1"
_NONCE = 12
SEED_BYTES = 16
KEY_BYTES = 32  # a raw X25519 private key

# The Shamir field F_p. p = 2^521 − 1 is a Mersenne prime (the field of NIST P-521): its
# primality is textbook, so there is no generated constant to trust. Why not a prime just above
# 2^256, which would give 33-byte shares instead of 66: the headroom. A share set with a random
# error interpolates to an unrelated element, which fits a 32-byte key with probability
# 2^256/p ≈ 2^-265 (a 16-byte seed: 2^-393), so `combine_secret`'s length check refuses such
# corruption almost surely; just above 2^256 it would almost never fire. It does not stop a
# chosen offset (seed + 1 fits); for s keys the server also compares the rebuilt key with the
# advertised public key. Speed is no reason to go smaller (see `_lagrange_weights`).
PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: one field element, big-endian
SHARE_PLAINTEXT = struct.calcsize(">H") + 2 * SHARE_BYTES


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def advert_payload(round_id: str, client_id: str, c_public: bytes, s_public: bytes) -> bytes:
    """What a client's identity key signs: (round id, client id, both public keys)."""
    return frame(KEYS_LABEL, round_id, client_id, c_public, s_public)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggProtocolError(f"unusable X25519 public key: {exc}") from exc


def mask_key(private: X25519PrivateKey, peer_public: bytes, round_id: str, u: str, v: str) -> bytes:
    """s_uv: the AES-128 key of the pairwise mask of u and v (same from either side)."""
    low, high = sorted((u, v))
    info = frame(_MASK_LABEL, round_id, low, high)
    return hkdf_sha256(agree(private, peer_public), length=16, info=info)


def mask_sign(owner: str, peer: str) -> int:
    """+1 if owner < peer else −1: the two ends of a pair add opposite masks, which cancel."""
    return 1 if owner < peer else -1


class MaskStream:
    """Adds ±PRG(key) to a word vector in place, reusing its buffers (no per-mask allocation)."""

    def __init__(self, length: int, bits: int) -> None:
        self._dtype = np.dtype(f"<u{bits // 8}")
        self._length = length
        self._zeros = bytes(length * self._dtype.itemsize)
        self._out = bytearray(len(self._zeros) + 15)  # update_into needs a block's slack

    def words(self, key: bytes) -> UIntArray:
        """The keystream of AES-128-CTR(key, IV 0) as words; valid until the next call."""
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(self._zeros, self._out)
        return np.frombuffer(self._out, dtype=self._dtype, count=self._length)

    def masked(self, words: UIntArray, key: bytes) -> UIntArray:
        """words + PRG(key) as a new little-endian array: the input is copied while masked,
        instead of copied first and then read and written again by `add`."""
        out = np.empty(self._length, dtype=self._dtype)
        np.add(words, self.words(key), out=out)
        return out

    def add(self, acc: UIntArray, key: bytes, sign: int = 1) -> None:
        stream = self.words(key)
        if sign > 0:
            np.add(acc, stream, out=acc)
        else:
            np.subtract(acc, stream, out=acc)


def share_key(
    private: X25519PrivateKey, peer_public: bytes, round_id: str, u: str, v: str
) -> bytes:
    low, high = sorted((u, v))
    info = frame(_SHARE_LABEL, round_id, low, high)
    return hkdf_sha256(agree(private, peer_public), length=32, info=info)


def share_ad(round_id: str, sender: str, receiver: str) -> bytes:
    return frame(_SHARE_LABEL, round_id, sender, receiver)


def seal_share(key: bytes, ad: bytes, index: int, b_share: bytes, s_share: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    plaintext = struct.pack(">H", index) + b_share + s_share
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_share(key: bytes, ad: bytes, ciphertext: bytes) -> tuple[int, bytes, bytes]:
    """(index, b-share, s-key share); `SecAggProtocolError` if tampered or bound elsewhere."""
    try:
        plaintext = AESGCM(key).decrypt(ciphertext[:_NONCE], ciphertext[_NONCE:], ad)
    except (InvalidTag, ValueError) as exc:
        raise SecAggProtocolError(
            "a key share does not decrypt: it was made for another round, sender or receiver, "
            "or altered on the way"
        ) from exc
    if len(plaintext) != SHARE_PLAINTEXT:
        raise SecAggProtocolError(
            f"a key share holds {len(plaintext)} bytes, not {SHARE_PLAINTEXT}"
        )
    (index,) = struct.unpack(">H", plaintext[:2])
    return index, plaintext[2 : 2 + SHARE_BYTES], plaintext[2 + SHARE_BYTES :]


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir t-of-`count` shares of `secret` (1 to 65 bytes); share i is f(i + 1), f(0) = secret.

    f has t − 1 coefficients drawn uniformly from F_p, so any t − 1 shares are uniform and
    independent of the secret (Shamir 1979); `secrets` because they are key material.
    """
    if not 0 < len(secret) < SHARE_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes; Shamir over F_p takes 1 to 65 bytes")
    if not 0 < threshold <= count < 2**16:
        raise ValueError(f"cannot split {threshold}-of-{count}; need 1 ≤ t ≤ count < 65536")
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    coefficients.append(int.from_bytes(secret, "big"))  # highest degree first, f(0) last
    shares: list[bytes] = []
    for x in range(1, count + 1):
        y = 0
        for c in coefficients:  # Horner
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def combine_secret(
    shares: Sequence[tuple[int, bytes]], threshold: int, what: str, *, size: int
) -> bytes:
    """The `size`-byte secret from ≥ t shares (x, data); fewer fail the round, never mislead.

    Below t, Lagrange interpolation still returns a field element, but it is independent of the
    secret (Shamir 1979), so the count is checked here instead of trusting the result. The first
    t distinct shares by x are used; a value that does not fit in `size` bytes means a corrupt
    share and is refused (see `PRIME`).
    """
    distinct = dict(shares)
    if len(distinct) < threshold:
        raise SecAggRoundFailedError(
            f"{what}: {len(distinct)} shares but {threshold} are needed; too many clients dropped"
        )
    points = [(x, _share_value(x, data, what)) for x, data in sorted(distinct.items())]
    value = _interpolate_at_zero(points[:threshold])
    if value >> (8 * size):
        raise SecAggRoundFailedError(
            f"{what}: the shares rebuild a {value.bit_length()}-bit value, not a {size}-byte "
            "secret; a holder revealed a corrupt share, so the round cannot be finished"
        )
    return value.to_bytes(size, "big")


def is_share(data: bytes) -> bool:
    """Whether `data` can be a share: SHARE_BYTES big-endian bytes of an element of F_p."""
    return len(data) == SHARE_BYTES and int.from_bytes(data, "big") < PRIME


def _share_value(x: int, data: bytes, what: str) -> int:
    """The field element of one share; `SecAggProtocolError` if it cannot be one."""
    if len(data) != SHARE_BYTES:
        raise SecAggProtocolError(
            f"{what}: a share of {len(data)} bytes, not {SHARE_BYTES}; shares of unequal or "
            "invalid length"
        )
    y = int.from_bytes(data, "big")
    if not 0 < x < 2**16 or y >= PRIME:
        raise SecAggProtocolError(f"{what}: share at x = {x} is not a point of F_p (malformed)")
    return y


def _interpolate_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """f(0) by Lagrange: Σ y_i · Π_{j≠i} x_j / (x_j − x_i) mod p."""
    weights, inverse = _lagrange_weights(tuple(x for x, _ in points))
    acc = sum(w * y for w, (_, y) in zip(weights, points, strict=True))
    return acc * inverse % PRIME


@functools.lru_cache(maxsize=256)
def _lagrange_weights(xs: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Integers w_i and L⁻¹ mod p with f(0) = L⁻¹ · Σ w_i · y_i, for distinct small x.

    Each basis value Π_{j≠i} x_j / (x_j − x_i) is a fraction of small integers; over
    L = lcm(denominators) the sum needs one modular inverse (of the small L) instead of one per
    point. Cached (a pure function of the x) because a server rebuilds every survivor's seed from
    the same x = 1..t when the first t holders answered: O(t) per secret instead of O(t²).
    """
    nums: list[int] = []
    dens: list[int] = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num *= xj
                den *= xj - xi
        nums.append(num)
        dens.append(den)
    common = math.lcm(*dens)
    weights = tuple(num * (common // den) for num, den in zip(nums, dens, strict=True))
    return weights, pow(common, -1, PRIME)


def verify_advert(
    advert: KeyAdvertisement,
    *,
    round_id: str,
    roster: Mapping[str, bytes],
    seen_public_keys: AbstractSet[bytes],
) -> None:
    """Refuse an advert for another round, of an unknown client, unsigned, or with a used key."""
    who = f"client {advert.client_id!r}"
    if advert.round_id != round_id:
        raise SecAggProtocolError(f"{who} advertised keys for round {advert.round_id!r}")
    identity_key = roster.get(advert.client_id)
    if identity_key is None:
        raise SecAggProtocolError(f"{who} is not in the roster of identity keys")
    if len(advert.c_public) != 32 or len(advert.s_public) != 32:
        raise SecAggProtocolError(f"{who} advertised X25519 keys of the wrong length")
    if advert.c_public == advert.s_public:
        raise SecAggProtocolError(f"{who} advertised the same key for shares and masks")
    payload = advert_payload(round_id, advert.client_id, advert.c_public, advert.s_public)
    try:
        verify_signature(identity_key, advert.signature, payload)
    except SignatureError as exc:
        raise SecAggProtocolError(
            f"{who}: key advertisement is not signed by its identity"
        ) from exc
    if {advert.c_public, advert.s_public} & seen_public_keys:
        raise SecAggProtocolError(
            f"{who} reuses a public key seen in an earlier round; keys must be fresh per round"
        )
