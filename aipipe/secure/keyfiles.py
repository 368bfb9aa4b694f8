"""Private key files: written with mode 0600 from the first byte, refused when others can read
them (as ssh refuses a loose private key); in a home encrypted at rest, sealed with its key
(`aipipe.secure.at_rest`) for the label ``file:<name>``, so every private file of a home goes
through one code path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from aipipe.errors import IdentityError
from aipipe.secure.at_rest import PLAIN, AtRest

PRIVATE_MODE = 0o600


def file_label(path: Path) -> str:
    """What a private file is sealed for: its name (a file moved to another name won't open)."""
    return f"file:{path.name}"


def write_private(
    path: Path,
    data: bytes,
    *,
    what: str,
    replace: bool = True,
    at_rest: AtRest = PLAIN,
    label: str | None = None,
) -> None:
    """Write `data` readable by its owner only (sealed under `at_rest` for `label`, by default
    the file's own name); with `replace=False` never overwrite a file."""
    data = at_rest.seal(data, label or file_label(path))
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


def read_private(
    path: Path, *, what: str, at_rest: AtRest = PLAIN, label: str | None = None
) -> bytes:
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
    return at_rest.open(data, label or file_label(path), where=f"{what} {path}")


def pem_bytes(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_pem(path: Path, *, what: str, at_rest: AtRest = PLAIN) -> PrivateKeyTypes:
    data = read_private(path, what=what, at_rest=at_rest)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise IdentityError(f"{what} {path} is not an unencrypted PEM private key") from exc
