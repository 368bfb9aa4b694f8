"""Passwords (scrypt, from `cryptography`) and TOTP codes (RFC 6238, `pyotp`) of the hub's people.

A password hash is ``scrypt$<log2 n>$<r>$<p>$<salt>$<key>`` (base64 salt and key), so its
parameters travel with it. A TOTP code is checked against the current 30-second step and the
one before and after (clock skew); `totp_step` returns the step it matched, which the store
spends so the same code never works twice.
"""

from __future__ import annotations

import base64
import functools
import hmac
import secrets
from datetime import datetime

import pyotp
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

_LOG2_N, _R, _P, _LENGTH = 15, 8, 1, 32
TOTP_SKEW_STEPS = 1


def _kdf(salt: bytes, log2_n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=_LENGTH, n=2**log2_n, r=r, p=p)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _kdf(salt, _LOG2_N, _R, _P).derive(password.encode())
    parts = (str(_LOG2_N), str(_R), str(_P), _b64(salt), _b64(key))
    return "scrypt$" + "$".join(parts)


def verify_password(password: str, stored: str | None) -> bool:
    """True if `password` matches `stored`; with no stored hash (an unknown person) the same
    work is done against a throwaway one, so the answer takes as long."""
    try:
        scheme, log2_n, r, p, salt, key = (stored or _dummy()).split("$")
        if scheme != "scrypt":
            return False
        _kdf(_unb64(salt), int(log2_n), int(r), int(p)).verify(password.encode(), _unb64(key))
    except (InvalidKey, ValueError):
        return False
    return stored is not None


def new_password() -> str:
    """A one-time password an admin hands to a new person (~128 bits)."""
    return secrets.token_urlsafe(16)


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, person: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app reads (as a QR code or pasted)."""
    return pyotp.TOTP(secret).provisioning_uri(name=person, issuer_name=issuer)


def totp_step(secret: str, code: str, at: datetime) -> int | None:
    """The time step `code` is valid for around `at` (latest first), or None."""
    totp = pyotp.TOTP(secret)
    now = totp.timecode(at)
    for step in range(now + TOTP_SKEW_STEPS, now - TOTP_SKEW_STEPS - 1, -1):
        if hmac.compare_digest(totp.generate_otp(step), code.strip()):
            return step
    return None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


@functools.cache
def _dummy() -> str:
    return hash_password(secrets.token_urlsafe(16))
