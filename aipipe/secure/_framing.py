"""Canonical, unambiguous byte encodings of field tuples, for signatures, KDF labels and AEAD data.

Each field is prefixed by its length (u32 big-endian), so ("ab", "c") and ("a", "bc") never encode
alike; a signature or an associated-data string over `frame(...)` therefore binds every field.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def frame(*parts: bytes | str | int) -> bytes:
    """Length-prefixed concatenation; str is UTF-8, int is u64 big-endian."""
    out = bytearray()
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, int):
            data = part.to_bytes(8, "big")
        else:
            data = bytes(part)
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def hkdf_sha256(secret: bytes, *, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """RFC 5869 HKDF-SHA256 (`cryptography`): turns an X25519 shared secret into a key."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)
