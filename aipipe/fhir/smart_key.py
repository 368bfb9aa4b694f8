"""The node's SMART client key: an ES384 (P-384) or RS384 (RSA 3072) private key whose public
JWK Set the EHR registers for the node's client_id. `kid` is the RFC 7638 JWK thumbprint.
The private key rests as PEM with mode 0600 and is refused when others can read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aipipe.errors import ConfigError, IdentityError
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.secure.keyfiles import load_private_pem, pem_bytes, write_private

Alg = Literal["ES384", "RS384"]
RSA_BITS = 3072


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(size, "big"))


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint: the required members, sorted, without whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}.get(jwk.get("kty", ""))
    if required is None or any(name not in jwk for name in required):
        raise IdentityError(f"JWK {sorted(jwk)} is not a complete EC or RSA public key")
    members = {name: jwk[name] for name in required}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SmartKey:
    """The node's private key for SMART client assertions, and its public JWK Set."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_key(self.key, "SMART key")

    @classmethod
    def generate(cls, alg: Alg = "ES384") -> SmartKey:
        if alg == "ES384":
            return cls(ec.generate_private_key(ec.SECP384R1()))
        if alg == "RS384":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS))
        raise ConfigError(f"SMART key algorithm must be ES384 or RS384, got {alg!r}")

    @classmethod
    def load(cls, path: Path, *, at_rest: AtRest = PLAIN) -> SmartKey:
        """Read a PKCS#8 PEM key, refusing one that group or others can read (like ssh)."""
        key = load_private_pem(path, what="SMART key", at_rest=at_rest)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise IdentityError(f"SMART key {path} is not an EC P-384 or RSA key")
        return cls(key)

    def save(self, path: Path, *, at_rest: AtRest = PLAIN) -> None:
        """Write the key with mode 0600 from the first byte; never replace an existing key
        (it may be the one the EHR has registered)."""
        write_private(path, pem_bytes(self.key), what="SMART key", replace=False, at_rest=at_rest)

    @property
    def alg(self) -> Alg:
        return "ES384" if isinstance(self.key, ec.EllipticCurvePrivateKey) else "RS384"

    @property
    def kid(self) -> str:
        """The RFC 7638 thumbprint: stable for a key, so the EHR can match it to its JWK."""
        return jwk_thumbprint(self._bare_jwk())

    def public_jwk(self) -> dict[str, Any]:
        jwk = self._bare_jwk()
        jwk.update(kid=jwk_thumbprint(jwk), alg=self.alg, use="sig", key_ops=["verify"])
        return jwk

    def public_jwks(self) -> dict[str, Any]:
        """The JWK Set to hand to the EHR team for registration (public material only)."""
        return {"keys": [self.public_jwk()]}

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims, self.key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"}
        )

    def _bare_jwk(self) -> dict[str, Any]:
        public = self.key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            numbers = public.public_numbers()
            # RFC 7518 §6.2.1.2: coordinates are the full field size, 48 octets for P-384.
            return {
                "kty": "EC",
                "crv": "P-384",
                "x": _uint(numbers.x, 48),
                "y": _uint(numbers.y, 48),
            }
        rsa_numbers = public.public_numbers()
        return {"kty": "RSA", "n": _uint(rsa_numbers.n), "e": _uint(rsa_numbers.e)}


def _check_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, what: str) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP384R1):
        raise IdentityError(f"{what} is on curve {key.curve.name}; ES384 needs P-384 (secp384r1)")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise IdentityError(f"{what} is RSA-{key.key_size}; RS384 needs at least 2048 bits")
