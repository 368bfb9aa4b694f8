"""The cryptography of SecAgg+, as small pure functions over `cryptography` and pycryptodome.

- Key agreement: X25519; every shared secret goes through HKDF-SHA256 with a label that names the
  purpose, the round and both parties, so one agreement never yields the same key twice.
- PRG: AES-128-CTR keystream (zero IV; every key is used for one stream only) read as
  little-endian words; ~6–9 GB/s here, 7× NumPy's MT19937 (DESIGN §7).
- Shares: Shamir t-of-m over GF(2^128) (pycryptodome), one polynomial per 16-byte chunk, all
  chunks of one holder at the same x-coordinate; sent under AES-256-GCM keyed from the c-key
  agreement, with (round, sender, receiver) as associated data.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import numpy.typing as npt
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aipipe.errors import SignatureError
from aipipe.secure._framing import frame, hkdf_sha256
from aipipe.secure.errors import SecAggProtocolError, SecAggRoundFailedError
from aipipe.secure.identity import verify_signature
from aipipe.secure.secagg.messages import KeyAdvertisement

UIntArray = npt.NDArray[np.unsignedinteger[Any]]

KEYS_LABEL = b"aipipe/secagg/keys/v1"
_MASK_LABEL = b"aipipe/secagg/mask/v1"
_SHARE_LABEL = b"aipipe/secagg/share/v1"
_CHUNK = 16
_NONCE = 12
SEED_BYTES = 16
SHARE_PLAINTEXT = struct.calcsize(">H") + SEED_BYTES + 32


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
    return index, plaintext[2 : 2 + SEED_BYTES], plaintext[2 + SEED_BYTES :]


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir t-of-`count` shares of `secret` (a multiple of 16 bytes); share i has x = i + 1."""
    if not secret or len(secret) % _CHUNK:
        raise ValueError(f"secret of {len(secret)} bytes is not a positive multiple of {_CHUNK}")
    per_chunk = [
        Shamir.split(threshold, count, secret[i : i + _CHUNK])
        for i in range(0, len(secret), _CHUNK)
    ]
    return [b"".join(chunk[j][1] for chunk in per_chunk) for j in range(count)]


def combine_secret(shares: Sequence[tuple[int, bytes]], threshold: int, what: str) -> bytes:
    """The secret from ≥ t shares (x, data); fewer is a failed round, not a wrong answer.

    Below t, Lagrange interpolation still returns 16 bytes per chunk, but they are independent of
    the secret (Shamir 1979), so the count is checked here instead of trusting the result.
    """
    distinct = dict(shares)
    if len(distinct) < threshold:
        raise SecAggRoundFailedError(
            f"{what}: {len(distinct)} shares but {threshold} are needed; too many clients dropped"
        )
    chosen = sorted(distinct.items())[:threshold]
    size = len(chosen[0][1])
    if size == 0 or size % _CHUNK or any(len(data) != size for _, data in chosen):
        raise SecAggProtocolError(f"{what}: shares of unequal or invalid length")
    return b"".join(
        Shamir.combine([(x, data[i : i + _CHUNK]) for x, data in chosen])
        for i in range(0, size, _CHUNK)
    )


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
