"""Binary frames: a JSON header and a tensor payload in one HTTP body, without base64.

    frame = b"AIPF" | u32 little-endian header length | header JSON (UTF-8) | payload bytes

The payload is safetensors (never pickle); the header names its sha256 so a signature over the
header covers the tensors too.
"""

from __future__ import annotations

import struct

from aipipe.errors import WireDecodeError

MAGIC = b"AIPF"
MAX_HEADER = 64 * 1024
MEDIA_TYPE = "application/vnd.aipipe.frame"


class FrameError(WireDecodeError, ValueError):
    """A body that is not a well-formed frame (a `ValueError` too, as it was before)."""


def pack_frame(header_json: bytes, payload: bytes) -> bytes:
    if len(header_json) > MAX_HEADER:
        raise FrameError(f"frame header of {len(header_json)} bytes exceeds {MAX_HEADER}")
    return MAGIC + struct.pack("<I", len(header_json)) + header_json + payload


def unpack_frame(body: bytes) -> tuple[bytes, bytes]:
    """(header JSON, payload) of a frame; `FrameError` if malformed."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise FrameError("body is not an aipipe frame (bad magic)")
    (length,) = struct.unpack("<I", body[4:8])
    if length > MAX_HEADER or 8 + length > len(body):
        raise FrameError("frame header length is out of range")
    return body[8 : 8 + length], body[8 + length :]
