"""Private key files: written with mode 0600 from the first byte, refused when others can read
them (as ssh refuses a loose private key)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from aipipe.errors import IdentityError

PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes, *, what: str, replace: bool = True) -> None:
    """Write `data` readable by its owner only; with `replace=False` never overwrite a file."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except FileExistsError as exc:
        raise IdentityError(
            f"{what} {path} already exists; move it away first if you mean to replace it"
        ) from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, PRIVATE_MODE)


def read_private(path: Path, *, what: str) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    return data


def pem_bytes(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_pem(path: Path, *, what: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(read_private(path, what=what), password=None)
    except ValueError as exc:
        raise IdentityError(f"{what} {path} is not an unencrypted PEM private key") from exc
