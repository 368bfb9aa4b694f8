"""A node's SecAgg+ round in progress, sealed on its own disk, so the round survives a restart
of the hub or of the node itself instead of losing the node's round keys.

<home>/secure/rounds/<study>/round-<n>.state   nonce (12 bytes) ‖ AES-256-GCM(JSON state),
                                               mode 0600

The key is HKDF-SHA256 of the node's X25519 sealing key (the vault's, which never leaves the
node); the associated data names the study and round, so a state file cannot be passed off as
another round's. The state holds the round's private keys, the shares received, and every
message the node made, written before that message leaves: after a restart the node re-sends
exactly what it sent (the hub answers an identical re-send with OK) and never makes a second,
different message for a stage — above all never a second unmask reply. The file is deleted
when the round ends for the node, whatever the outcome.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, ValidationError

from aipipe.secure._framing import frame, hkdf_sha256
from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.keyfiles import file_label, read_private, write_private
from aipipe.secure.secagg.client import ClientState
from aipipe.wire import RoundWork
from aipipe.wire.secure import SecAggRoundConfig

if TYPE_CHECKING:
    from aipipe.node.vault import SecureVault

_INFO = b"aipipe node secagg round state v1"
_NONCE_BYTES = 12


class RoundStateError(SecureAggregationError):
    """A saved round state that cannot be opened (tampered, another node's, or malformed)."""


class SecAggRoundState(BaseModel):
    """One node's side of one SecAgg+ round, as far as it got.

    `sent` maps a step (advert, shares, masked, unmask) to the exact bytes the node sends for
    it; `client` is the protocol state (None before the round config was fetched)."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    item: RoundWork
    epsilon: float | None = None
    sigma: float | None = None
    config: SecAggRoundConfig | None = None
    client: ClientState | None = None
    sent: dict[str, bytes] = {}
    survivors: int = 0

    @property
    def study(self) -> str:
        return self.item.study

    @property
    def number(self) -> int:
        return self.item.round


class RoundStates:
    """The sealed states of the SecAgg+ rounds this node has in progress."""

    def __init__(self, vault: SecureVault) -> None:
        self._vault = vault
        self.directory = vault.directory / "rounds"

    def _key(self) -> bytes:
        secret = self._vault.sealing_key().private_bytes_raw()
        return hkdf_sha256(secret, length=32, info=_INFO)

    def path(self, study: str, number: int) -> Path:
        return self.directory / study / f"round-{number}.state"

    def save(self, state: SecAggRoundState) -> None:
        """Seal and write the state (atomically: a crash leaves the old one or the new one)."""
        path = self.path(state.study, state.number)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self._key()).encrypt(
            nonce, state.model_dump_json().encode(), frame(state.study, state.number)
        )
        tmp = path.with_suffix(".tmp")
        write_private(tmp, nonce + sealed, what="SecAgg+ round state",
                      at_rest=self._vault.at_rest, label=file_label(path))  # fmt: skip
        os.replace(tmp, path)

    def load(self, path: Path) -> SecAggRoundState:
        data = read_private(path, what="SecAgg+ round state", at_rest=self._vault.at_rest)
        study, number = path.parent.name, int(path.stem.removeprefix("round-"))
        try:
            plain = AESGCM(self._key()).decrypt(
                data[:_NONCE_BYTES], data[_NONCE_BYTES:], frame(study, number)
            )
            state = SecAggRoundState.model_validate_json(plain)
        except (InvalidTag, ValidationError, ValueError) as exc:
            raise RoundStateError(
                f"SecAgg+ round state {path} cannot be opened with this node's sealing key "
                f"({type(exc).__name__}); the round is lost to this node: delete the file"
            ) from exc
        if (state.study, state.number) != (study, number):
            raise RoundStateError(f"SecAgg+ round state {path} is for another round")
        return state

    def pending(self) -> list[Path]:
        """Saved states, oldest round first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("*/round-*.state"), key=lambda p: p.stat().st_mtime)

    def delete(self, study: str, number: int) -> None:
        self.path(study, number).unlink(missing_ok=True)
