"""Encryption at rest: a home's private files and PHI columns sealed with AES-256-GCM under a
key the operator supplies (a 0600 file or `AIPIPE_AT_REST_KEY`), never stored in the home.

A sealed value is

    MAGIC (6) ‖ key id (8) ‖ label length (2, big-endian) ‖ label (UTF-8) ‖ nonce (12) ‖ GCM

where GCM is AES-256-GCM of the plaintext under the key, with a fresh random 96-bit nonce and
everything before the nonce as associated data. The key id, HMAC-SHA256(key, "aipipe-at-rest-
key-id") cut to 8 bytes, tells a wrong key from a tampered value without revealing the key. The
label names where the value belongs (``file:identity.key``, ``resources/Patient/<id>``,
``blob:<sha256>``): opening checks it, so a sealed file or row moved or swapped to another
place is refused instead of read as the other one. With 96-bit random nonces a key should seal
fewer than 2³² values (NIST SP 800-38D, 8.3); rotate it (`aipipe node rekey`) long before.

`AtRest` is how one home's data rests: sealed under its key (and, during a rotation, readable
under the old key too), or `PLAIN` for a home that is not encrypted, where nothing changes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field

from aipipe.errors import AtRestKeyError, SealedDataError

MAGIC = b"AIPAR\x01"
KEY_BYTES = 32
_ID_BYTES = 8
_NONCE_BYTES = 12
_KEY_ID_LABEL = b"aipipe-at-rest-key-id"
Scalar = str | int | float | None
SUPPLY = "supply it with --at-rest-key-file FILE, AIPIPE_AT_REST_KEY_FILE or AIPIPE_AT_REST_KEY"


class AtRestKey:
    """A 32-byte AES-256 key; its repr and `key_id` never show the key."""

    __slots__ = ("_aesgcm", "_id_bytes", "_secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise AtRestKeyError(f"an at-rest key is {KEY_BYTES} bytes, not {len(secret)}")
        self._secret = secret
        self._id_bytes = hmac.new(secret, _KEY_ID_LABEL, hashlib.sha256).digest()[:_ID_BYTES]
        self._aesgcm = AESGCM(secret)  # its key schedule made once, not per value

    @classmethod
    def generate(cls) -> AtRestKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str, *, source: str) -> AtRestKey:
        """A key written as base64 or hex (64 digits), surrounding whitespace ignored."""
        value = text.strip()
        raw: bytes | None = None
        if len(value) == 2 * KEY_BYTES:
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raw = None
        if raw is None:
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
        if len(raw) != KEY_BYTES:
            raise AtRestKeyError(
                f"{source} does not hold a {KEY_BYTES}-byte key in base64 or hex; "
                "make one with: aipipe keygen at-rest FILE"
            )
        return cls(raw)

    @classmethod
    def from_file(cls, path: Path) -> AtRestKey:
        """The key in `path`, refused when others may read the file (as ssh refuses a loose key)."""
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise AtRestKeyError(f"cannot read at-rest key file {path}: {reason}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AtRestKeyError(
                f"at-rest key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
        return cls.from_text(text, source=f"at-rest key file {path}")

    def write(self, path: Path) -> None:
        """Write the key as base64 to a new file, mode 0600 from the first byte."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise AtRestKeyError(f"{path} already exists; a key file is never replaced") from exc
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(base64.b64encode(self._secret).decode() + "\n")

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key (an HMAC under it: reveals nothing of the key)."""
        return self._id_bytes.hex()

    def _aead(self) -> AESGCM:
        return self._aesgcm

    def __repr__(self) -> str:
        return f"AtRestKey(id={self.key_id})"


class AtRestConfig(BaseModel):
    """A home's `at_rest` setting: the id of the key its data is sealed under, and while a
    rotation is under way the id of the key it is moving to."""

    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    rotating_to: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")


def is_sealed(data: bytes | str | None) -> bool:
    return isinstance(data, bytes) and data.startswith(MAGIC)


def _parse(data: bytes) -> tuple[bytes, str, int]:
    """(key id, label, offset of the nonce) of a sealed value."""
    head = len(MAGIC) + _ID_BYTES
    if len(data) < head + 2:
        raise SealedDataError("a sealed value is truncated")
    key_id = data[len(MAGIC) : head]
    size = int.from_bytes(data[head : head + 2], "big")
    label = data[head + 2 : head + 2 + size].decode("utf-8", errors="replace")
    return key_id, label, head + 2 + size


def sealed_key_id(data: bytes) -> str:
    """The id of the key a sealed value was sealed under."""
    return _parse(data)[0].hex()


class AtRest:
    """How one home's data rests: sealed under `key` (opening also under `also`, the old key
    of a rotation), or plain when `key` is None."""

    def __init__(self, key: AtRestKey | None, *, also: Sequence[AtRestKey] = ()) -> None:
        self.key = key
        self._keys = {k._id_bytes: k for k in (*also, *([key] if key else []))}

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def holds(self, key_id: str) -> bool:
        """Whether values sealed under key `key_id` open here."""
        return any(k.key_id == key_id for k in self._keys.values())

    def seal(self, data: bytes, label: str) -> bytes:
        """`data` sealed for `label` under the current key (unchanged in a plain home)."""
        if self.key is None:
            return data
        encoded = label.encode()
        header = MAGIC + self.key._id_bytes + len(encoded).to_bytes(2, "big") + encoded
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self.key._aead().encrypt(nonce, data, header)

    def open(self, data: bytes, label: str, *, where: str) -> bytes:
        """The plaintext of `data`, sealed for `label`; `where` names it in errors."""
        if not is_sealed(data):
            if self.key is None:
                return data
            raise SealedDataError(
                f"{where} is not sealed although this home is encrypted at rest: it was put "
                "there from outside aipipe; restore it from a backup"
            )
        key_id, stored, start = _parse(data)
        if stored != label:
            raise SealedDataError(
                f"{where} holds data sealed for '{stored}', not for '{label}': it was moved or "
                "swapped; restore it from a backup"
            )
        key = self._keys.get(key_id)
        if key is None:
            given = "no at-rest key was given" if self.key is None else (
                f"the key given is {self.key.key_id}"
            )  # fmt: skip
            raise AtRestKeyError(
                f"{where} is sealed under at-rest key {key_id.hex()} but {given}; {SUPPLY}"
            )
        try:
            return key._aead().decrypt(data[start : start + _NONCE_BYTES],
                                       data[start + _NONCE_BYTES :], data[:start])  # fmt: skip
        except InvalidTag as exc:
            raise SealedDataError(
                f"{where} does not open under at-rest key {key_id.hex()}: it was altered or "
                "truncated; restore it from a backup"
            ) from exc

    def seal_text(self, text: str, label: str) -> str | bytes:
        """A text column's value: the text itself in a plain home, else the sealed bytes."""
        return text if self.key is None else self.seal(text.encode(), label)

    def open_text(self, value: str | bytes, label: str, *, where: str) -> str:
        if isinstance(value, str):
            return self.open(value.encode(), label, where=where).decode()
        return self.open(value, label, where=where).decode()

    def seal_field(self, value: Scalar, label: str) -> Scalar | bytes:
        """A column's value (text or number) sealed as JSON; NULL stays NULL (so `IS NULL`
        still works, and whether a value is there stays visible)."""
        if self.key is None or value is None:
            return value
        return self.seal(json.dumps(value).encode(), label)

    def open_field(self, value: Scalar | bytes, label: str, *, where: str) -> Scalar:
        if value is None or (self.key is None and not isinstance(value, bytes)):
            return value
        if not isinstance(value, bytes):
            raise SealedDataError(
                f"{where} is not sealed although this home is encrypted at rest: it was put "
                "there from outside aipipe; restore the store from a backup"
            )
        opened: Scalar = json.loads(self.open(value, label, where=where))
        return opened

    def reseal(self, data: bytes, *, where: str) -> bytes | None:
        """`data` sealed again under the current key, for the label it was sealed for; None
        when it already is (a rotation rerun after a crash skips what it finished)."""
        if self.key is None or not is_sealed(data):
            return None
        key_id, label, _ = _parse(data)
        if key_id == self.key._id_bytes:
            return None
        return self.seal(self.open(data, label, where=where), label)


PLAIN = AtRest(None)


def home_at_rest(what: str, setting: AtRestConfig | None, key: AtRestKey | None) -> AtRest:
    """The `AtRest` of a home (`what`, e.g. "node home /srv/aipipe") whose config says
    `setting`, opened with `key`: refused when the home is encrypted and the key is missing or
    another, or while a rotation is unfinished. A key given for a plain home is not used."""
    if setting is None:
        return PLAIN
    if setting.rotating_to is not None:
        raise AtRestKeyError(
            f"{what} is being moved from at-rest key {setting.key_id} to {setting.rotating_to} "
            "and the rotation did not finish; finish it: rerun `rekey` with the old key and "
            "--new-key-file of the new one"
        )
    if key is None:
        raise AtRestKeyError(f"{what} is encrypted at rest (key id {setting.key_id}); {SUPPLY}")
    if key.key_id != setting.key_id:
        raise AtRestKeyError(
            f"{what} is encrypted under at-rest key {setting.key_id}, but the key given is "
            f"{key.key_id}; supply that home's key (after a rotation, the new one)"
        )
    return AtRest(key)
