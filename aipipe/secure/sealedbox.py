"""Sealed box: encrypt bytes to one recipient's X25519 public key (ephemeral-static ECDH).

    sealed = eph_pub(32) ‖ nonce(12) ‖ AES-256-GCM(key, nonce, plaintext, ad)
    key    = HKDF-SHA256(X25519(eph, recipient), salt = eph_pub ‖ recipient_pub, info = label)

The construction of libsodium's `crypto_box_seal` and of HPKE's base mode (RFC 9180), built from
`cryptography` primitives: a fresh ephemeral key per message gives each message its own AES key,
so the random nonce never repeats under a key. Only the holder of the recipient's private key can
open it; the associated data (e.g. study and recipient ids) must match exactly, so a box sealed
for another study or recipient does not open. The box does not say who sealed it: callers that
need the sender's identity sign the sealed bytes (see `aipipe.secure.ckks.seal_context`).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aipipe.secure._framing import hkdf_sha256
from aipipe.secure.errors import SealedBoxError

_INFO = b"aipipe/sealed-box/v1"
_KEY = 32
_NONCE = 12


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of `key`'s public half: what a recipient publishes."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return hkdf_sha256(shared, length=_KEY, info=_INFO, salt=eph_pub + recipient_pub)


def seal(plaintext: bytes, *, recipient_public_key: bytes, associated_data: bytes) -> bytes:
    try:
        recipient = X25519PublicKey.from_public_bytes(recipient_public_key)
    except ValueError as exc:
        raise SealedBoxError(f"recipient key is not an X25519 public key: {exc}") from exc
    eph = X25519PrivateKey.generate()
    eph_pub = x25519_public_bytes(eph)
    try:
        shared = eph.exchange(recipient)
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise SealedBoxError("recipient key is a low-order point; refusing to seal") from exc
    key = _derive(shared, eph_pub, recipient_public_key)
    nonce = os.urandom(_NONCE)
    return eph_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(sealed: bytes, *, recipient_key: X25519PrivateKey, associated_data: bytes) -> bytes:
    """The plaintext; `SealedBoxError` for another recipient or associated data, or tampering."""
    if len(sealed) < 32 + _NONCE + 16:
        raise SealedBoxError(f"sealed box of {len(sealed)} bytes is too short")
    eph_pub, nonce, body = sealed[:32], sealed[32 : 32 + _NONCE], sealed[32 + _NONCE :]
    try:
        shared = recipient_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        key = _derive(shared, eph_pub, x25519_public_bytes(recipient_key))
        return AESGCM(key).decrypt(nonce, body, associated_data)
    except (InvalidTag, ValueError) as exc:
        raise SealedBoxError(
            "sealed box does not open: it was sealed for another recipient or other associated "
            "data (study, recipient), or it was altered"
        ) from exc
