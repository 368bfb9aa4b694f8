"""Signed heads kept outside the log: what catches a log truncated, wiped or recreated.

A checkpoint inside ``audit.sqlite`` proves the events before it, but someone who can write the
file can also delete the newest events together with their checkpoints, or replace the whole
file. An `Anchor` is a checkpoint (seq, head hash, Ed25519 signature, public key) copied
somewhere else: into every ``aipipe audit export`` (printed and written beside the export), into
the ``X-Aipipe-Audit-Head`` header of every hub response, and into each node's home
(``hub-audit-head``), which keeps the highest hub head that node has seen. ``aipipe audit verify
--anchor`` then requires the log to still hold that exact event at that seq.

The compact form is ``<seq>.<hash>.<signature>.<public key>`` (decimal, then hex), short enough
for a header and for a ticket.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aipipe.audit.events import Checkpoint, checkpoint_message
from aipipe.errors import ConfigError, SignatureError
from aipipe.secure.identity import verify_signature

HEADER = "X-Aipipe-Audit-Head"
"""The hub's response header carrying its latest signed audit head."""

HUB_HEAD_FILE = "hub-audit-head"
"""The file in a node home that keeps the highest hub head the node has seen."""

_COMPACT = re.compile(r"^([0-9]{1,18})\.([0-9a-f]{64})\.([0-9a-f]{128})\.([0-9a-f]{64})$")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchor:
    """A signed audit head: event `seq` of the log had hash `hash` when `public_key` signed it."""

    seq: int
    hash: str
    signature: str
    public_key: str

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Anchor:
        return cls(checkpoint.seq, checkpoint.hash, checkpoint.signature, checkpoint.public_key)

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """Read the compact form; raise `ConfigError` if malformed or its signature is bad."""
        match = _COMPACT.match(text.strip())
        if match is None:
            raise ConfigError(
                f"{text.strip()[:40]!r} is not an audit anchor; expected "
                "<seq>.<hash>.<signature>.<public key> as `aipipe audit export` prints it"
            )
        seq, head, signature, key = match.groups()
        anchor = cls(int(seq), head, signature, key)
        anchor.check_signature()
        return anchor

    @classmethod
    def load(cls, value: str) -> Anchor:
        """An anchor given as a file holding the compact form, or as the compact form itself."""
        path = Path(value)
        if _COMPACT.match(value.strip()) is None and path.is_file():
            try:
                value = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read audit anchor {path}: {exc}") from exc
        return cls.parse(value)

    def compact(self) -> str:
        return f"{self.seq}.{self.hash}.{self.signature}.{self.public_key}"

    def check_signature(self) -> None:
        """Raise `ConfigError` unless `public_key` signed (seq, hash)."""
        try:
            verify_signature(
                bytes.fromhex(self.public_key),
                bytes.fromhex(self.signature),
                checkpoint_message(self.seq, self.hash),
            )
        except (SignatureError, ValueError) as exc:
            raise ConfigError(
                f"the audit anchor at event {self.seq} has a signature that does not verify; "
                "copy it again from the export or the node's hub-audit-head file"
            ) from exc


class HeadRecorder:
    """Keeps, in one file, the highest-seq signed head a node has seen from its hub.

    `observe` is given every response's header value; it never raises (a bad header must not
    break the node's work), and warns when the hub shows a head that contradicts the kept one.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._last = ""  # the header value last handled: most responses repeat it

    def current(self) -> Anchor | None:
        try:
            return Anchor.parse(self._path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ConfigError):
            return None

    def observe(self, value: str) -> None:
        if value == self._last:
            return  # handled already: no second read of the file, no second signature check
        self._last = value
        try:
            seen = Anchor.parse(value)
        except ConfigError:
            _log.warning("the hub sent an audit head that does not verify; ignored")
            return
        kept = self.current()
        if kept is not None and seen.seq <= kept.seq:
            if seen.seq < kept.seq or seen.hash != kept.hash:
                _log.warning(
                    "the hub's audit head (event %d) contradicts the head this node saw before "
                    "(event %d): check the hub's log with `aipipe audit verify --anchor %s`",
                    seen.seq,
                    kept.seq,
                    self._path,
                )
            return
        self._write(seen)

    def _write(self, anchor: Anchor) -> None:
        partial = self._path.with_name(f".{self._path.name}.partial-{os.getpid()}")
        try:
            partial.write_text(anchor.compact() + "\n", encoding="utf-8")
            os.replace(partial, self._path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            _log.warning("cannot keep the hub's audit head in %s: %s", self._path, exc.strerror)
