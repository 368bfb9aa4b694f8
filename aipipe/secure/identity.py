"""Ed25519 identity keys: one per node and per hub, used to sign updates and audit checkpoints.

Private keys rest as unencrypted PKCS#8 PEM with file mode 0600; the file is refused if group or
others can read it, as ssh refuses a loose private key.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aipipe.errors import IdentityError, SignatureError

_PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key and the operations that need it."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read identity key {path}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"identity key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as exc:
            raise IdentityError(f"identity key {path} is not a PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity key {path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the key with mode 0600 from the first byte: never world-readable."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.chmod(path, _PRIVATE_MODE)

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
