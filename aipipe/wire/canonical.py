"""Canonical, unambiguous byte encodings of field tuples, for signatures, KDF labels and AEAD data.

Each field is prefixed by its length (u32 big-endian), so ("ab", "c") and ("a", "bc") never encode
alike; a signature or an associated-data string over `frame(...)` therefore binds every field.
Messages sign these bytes (`aipipe.wire.secure`), so they live in the wire layer; the secure
primitives import them from here (`aipipe.secure._framing`).
"""

from __future__ import annotations

import struct


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
