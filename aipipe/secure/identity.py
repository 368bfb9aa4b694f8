"""Ed25519 identity keys: one per node and per hub, used to sign updates and audit checkpoints.

Private keys rest as unencrypted PKCS#8 PEM with file mode 0600; the file is refused if group or
others can read it, as ssh refuses a loose private key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aipipe.errors import IdentityError, SignatureError
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.secure.keyfiles import load_private_pem, pem_bytes, write_private


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key and the operations that need it."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path, *, at_rest: AtRest = PLAIN) -> Identity:
        key = load_private_pem(path, what="identity key", at_rest=at_rest)
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity key {path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: Path, *, at_rest: AtRest = PLAIN) -> None:
        """Write the key with mode 0600 from the first byte: never world-readable."""
        write_private(path, pem_bytes(self.key), what="identity key", at_rest=at_rest)

    @property
    def public_bytes(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise `SignatureError` unless `signature` is `public_key`'s signature of `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature does not verify against the claimed key") from exc
