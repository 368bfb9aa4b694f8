"""Canonical byte encodings (`frame`, defined in `aipipe.wire.canonical` so that the wire layer
imports nothing above it) and the KDF that the secure primitives derive keys with."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aipipe.wire.canonical import frame

__all__ = ["frame", "hkdf_sha256"]


def hkdf_sha256(secret: bytes, *, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """RFC 5869 HKDF-SHA256 (`cryptography`): turns an X25519 shared secret into a key."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)
