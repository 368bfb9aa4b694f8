"""Prove an audit chain unbroken, from the database or from a JSONL export.

The walk checks, in sequence order and stopping at the first break:

- sequence numbers run 1, 2, 3 … with no gap (a gap is a deleted event);
- each event's hash is the sha256 of its content (else it was edited);
- each event's ``prev_hash`` is the stored hash of the event before (else events were reordered,
  or one was rewritten and its hash recomputed);
- each checkpoint's Ed25519 signature verifies, its key is a trusted one when keys are given, and
  it signs the hash that event now has (else the events up to it were rewritten after signing);
- no checkpoint lies beyond the last event (else events were deleted from the end);
- the log holds a signed ``audit.policy`` event (its promise of a checkpoint every N events) and
  keeps it: a checkpoint at the policy event and at every multiple of N after it (else checkpoint
  rows were deleted so that a rewrite could be rehashed, or the whole log was wiped or recreated
  by someone without the key). An empty log, or one with no policy, fails unless
  ``allow_unsigned``.

The at most N−1 events after the last checkpoint are reported as ``unanchored``; ``strict`` fails
on any (a log after its process stopped, or an export, ends in a checkpoint). Deleting events
together with the checkpoints after them, down to an earlier checkpoint, or replacing the file
with an older copy, is only caught by an `Anchor` kept outside the file: with ``anchor``, the
log must still hold that exact event at that seq.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from aipipe.audit.anchor import Anchor
from aipipe.audit.events import (
    GENESIS_HASH,
    Action,
    Checkpoint,
    checkpoint_message,
    content_hash,
    record_from_row,
)
from aipipe.audit.storage import read_snapshot
from aipipe.errors import AuditChainBrokenError, SignatureError, SourceError
from aipipe.secure.identity import verify_signature


@dataclass(frozen=True)
class VerifyReport:
    """What a successful verification proved."""

    events: int
    first_time: str | None
    last_time: str | None
    checkpoints: int
    head_hash: str
    signers: tuple[str, ...]
    """Hex public keys that signed checkpoints; compare them with the owner's key if unpinned."""
    pinned: bool
    """Whether checkpoint keys were checked against trusted keys."""
    checkpoint_every: int | None = None
    """The cadence the log's latest policy promises; ``None`` for an unsigned log."""
    unanchored: int = 0
    """Events after the last checkpoint (at most ``checkpoint_every`` − 1 unless unsigned)."""
    anchored_at: int | None = None
    """The seq of the outside anchor the log was checked against, if one was given."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "signers": list(self.signers)}


def _short(key: str) -> str:
    return f"{key[:16]}…"


@dataclass(frozen=True)
class _Rules:
    """What a verification demands beyond an unbroken chain."""

    anchor: Anchor | None = None
    strict: bool = False
    allow_unsigned: bool = False


class _ChainWalk:
    """Feed events in file or table order with `add`, then `finish` for the report."""

    def __init__(
        self,
        checkpoints: Iterable[Checkpoint],
        trusted_keys: Collection[bytes] | None,
        rules: _Rules | None = None,
    ) -> None:
        checkpoints = list(checkpoints)
        for checkpoint in checkpoints:
            if not isinstance(checkpoint.seq, int) or checkpoint.seq < 1:
                raise AuditChainBrokenError(
                    f"a checkpoint names event {checkpoint.seq!r}, which cannot exist: "
                    "the checkpoints were edited",
                    first_bad_seq=1,
                )
        self._pending = deque(sorted(checkpoints, key=lambda c: c.seq))
        self._trusted = None if trusted_keys is None else {key.hex() for key in trusted_keys}
        self._signers: set[str] = set()
        self._verified = 0
        self._last_checkpoint = 0
        self._expected = 1
        self._prev_hash = GENESIS_HASH
        self._first_time: str | None = None
        self._last_time: str | None = None
        self._rules = rules or _Rules()
        self._every: int | None = None
        self._policy_seq = 0
        anchor = self._rules.anchor
        if anchor is not None and self._trusted and anchor.public_key not in self._trusted:
            self._broken(
                f"the outside anchor is signed by key {_short(anchor.public_key)}, not by the "
                "key this log is checked against: the owner's key was replaced, or the anchor "
                "belongs to another log",
                1,
            )

    def add(self, record: Mapping[str, Any]) -> None:
        seq = self._check_seq(record.get("seq"))
        try:
            recomputed: str | None = content_hash(record)
        except (TypeError, ValueError):
            recomputed = None
        own_ok = recomputed is not None and recomputed == record.get("hash")
        link_ok = record.get("prev_hash") == self._prev_hash
        before = f"event {seq - 1}" if seq > 1 else "the genesis hash"
        if not own_ok and not link_ok:
            self._broken(
                f"event {seq} was replaced or moved: neither its hash nor its link to {before} "
                "matches",
                seq,
            )
        if not own_ok:
            self._broken(f"event {seq} was edited: its hash does not match its content", seq)
        if not link_ok:
            self._broken(
                f"event {seq} does not link to {before}: events were reordered, or one was "
                "rewritten with a recomputed hash",
                seq,
            )
        self._prev_hash = str(record["hash"])
        self._expected = seq + 1
        self._first_time = self._first_time or str(record.get("time"))
        self._last_time = str(record.get("time"))
        while self._pending and self._pending[0].seq == seq:
            self._check_checkpoint(self._pending.popleft(), self._prev_hash)
        if record.get("action") == Action.AUDIT_POLICY.value:
            self._adopt_policy(seq, record.get("details"))
        self._check_cadence(seq)
        anchor = self._rules.anchor
        if anchor is not None and anchor.seq == seq and anchor.hash != self._prev_hash:
            self._broken(
                f"event {seq} is not the event the outside anchor signed (hash "
                f"{anchor.hash[:16]}…): the log was rewritten, recreated or replaced",
                seq,
            )

    def _adopt_policy(self, seq: int, details: Any) -> None:
        every = details.get("checkpoint_every") if isinstance(details, Mapping) else None
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            self._broken(f"the audit policy at event {seq} names no valid cadence", seq)
        self._every, self._policy_seq = every, seq

    def _check_cadence(self, seq: int) -> None:
        every = self._every
        if every is None or self._last_checkpoint == seq:
            return
        if seq == self._policy_seq or seq % every == 0:
            self._broken(
                f"no signed checkpoint at event {seq}, though the log promises one every {every} "
                f"events (policy at event {self._policy_seq}): checkpoint rows were deleted, so "
                f"events {self._last_checkpoint + 1}–{seq} may have been rewritten",
                self._last_checkpoint + 1,
            )

    @property
    def expected_seq(self) -> int:
        """The sequence number the next event must carry."""
        return self._expected

    def finish(self) -> VerifyReport:
        last = self._expected - 1
        if self._pending:
            signed = self._pending[-1].seq
            self._broken(
                f"the log ends at event {last} but a checkpoint was signed at event {signed}: "
                f"events {last + 1} to {signed} were deleted from the end",
                last + 1,
            )
        self._finish_rules(last)
        return VerifyReport(
            events=last,
            first_time=self._first_time,
            last_time=self._last_time,
            checkpoints=self._verified,
            head_hash=self._prev_hash,
            signers=tuple(sorted(self._signers)),
            pinned=self._trusted is not None,
            checkpoint_every=self._every,
            unanchored=last - self._last_checkpoint,
            anchored_at=None if self._rules.anchor is None else self._rules.anchor.seq,
        )

    def _finish_rules(self, last: int) -> None:
        rules = self._rules
        if self._every is None and not rules.allow_unsigned:
            what = "is empty and has" if last == 0 else f"has {last} events but"
            self._broken(
                f"the log {what} no signed audit policy: it was wiped, recreated without the "
                "owner's key, or written unsigned (open it once with the owner's key, e.g. any "
                "aipipe command on the home, to sign it from now on)",
                1,
            )
        if rules.anchor is not None and last < rules.anchor.seq:
            self._broken(
                f"the log ends at event {last} but the outside anchor was signed at event "
                f"{rules.anchor.seq}: events {last + 1}–{rules.anchor.seq} were deleted, or "
                "the log was wiped or replaced by an older copy",
                last + 1,
            )
        if rules.strict and last > self._last_checkpoint:
            self._broken(
                f"events {self._last_checkpoint + 1}–{last} come after the last signed "
                "checkpoint: they were added, or the log's final checkpoint was removed",
                self._last_checkpoint + 1,
            )

    def _check_seq(self, seq: Any) -> int:
        expected = self._expected
        if not isinstance(seq, int) or isinstance(seq, bool):
            self._broken(f"the event after {expected - 1} has no valid sequence number", expected)
        if seq > expected:
            missing = f"event {expected}" if seq == expected + 1 else f"events {expected}–{seq - 1}"
            self._broken(
                f"{missing} missing: the log jumps from {expected - 1} to {seq} (events deleted)",
                expected,
            )
        if seq < expected:
            self._broken(
                f"event {seq} appears again after event {expected - 1}: events were duplicated "
                "or reordered",
                seq,
            )
        return int(seq)

    def _check_checkpoint(self, checkpoint: Checkpoint, event_hash: str) -> None:
        seq = checkpoint.seq
        key = str(checkpoint.public_key)
        if self._trusted is not None and key not in self._trusted:
            self._broken(
                f"checkpoint at event {seq} is signed by key {_short(key)}, not by the log "
                "owner's key: the log was re-signed by someone else",
                seq,
            )
        try:
            verify_signature(
                bytes.fromhex(key),
                bytes.fromhex(checkpoint.signature),
                checkpoint_message(seq, checkpoint.hash),
            )
        except (SignatureError, TypeError, ValueError):
            self._broken(
                f"checkpoint at event {seq} has a signature that does not verify: it was forged "
                "or altered",
                seq,
            )
        if checkpoint.hash != event_hash:
            self._broken(
                f"checkpoint at event {seq} signed a different hash than event {seq} has now: "
                f"events {self._last_checkpoint + 1}–{seq} were rewritten after it was signed",
                self._last_checkpoint + 1,
            )
        self._signers.add(key)
        self._verified += 1
        self._last_checkpoint = seq

    @staticmethod
    def _broken(message: str, first_bad_seq: int) -> NoReturn:
        raise AuditChainBrokenError(message, first_bad_seq=first_bad_seq)


def verify(
    path: Path,
    *,
    trusted_keys: Collection[bytes] | None = None,
    anchor: Anchor | None = None,
    strict: bool = False,
    allow_unsigned: bool = False,
) -> VerifyReport:
    """Verify the audit log at `path`; raise `AuditChainBrokenError` at the first break.

    With `trusted_keys` (raw Ed25519 public keys, the owner's), every checkpoint must be signed
    by one of them; without, any key whose signature verifies is accepted and listed in the report.
    `anchor`, a signed head kept outside the file, must still be in the log; `strict` fails on
    events after the last checkpoint; `allow_unsigned` accepts a log with no signed policy (the
    chain is then all that is checked).
    """
    rules = _Rules(anchor, strict, allow_unsigned)
    with read_snapshot(path) as snapshot:
        walk = _ChainWalk(snapshot.checkpoints, trusted_keys, rules)
        for row in snapshot.event_rows():
            walk.add(record_from_row(row))
        return walk.finish()


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read audit export {path}: {exc}") from exc


def verify_jsonl(
    path: Path,
    *,
    trusted_keys: Collection[bytes] | None = None,
    anchor: Anchor | None = None,
    strict: bool = False,
    allow_unsigned: bool = False,
) -> VerifyReport:
    """Verify a JSONL export (`aipipe.audit.export`) without the database, as `verify` does.

    Lines are events, or ``{"checkpoint": {...}}`` records; a line that is not a JSON object was
    edited or cut and breaks the chain where it stands.
    """
    checkpoints = []
    for _, line in _jsonl_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # reported in order by the second pass
        if isinstance(record, dict) and "checkpoint" in record:
            fields = record["checkpoint"]  # not an object: seq None, which the walk refuses
            checkpoints.append(Checkpoint.from_dict(fields if isinstance(fields, dict) else {}))
    walk = _ChainWalk(checkpoints, trusted_keys, _Rules(anchor, strict, allow_unsigned))
    for number, line in _jsonl_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            expected = walk.expected_seq
            raise AuditChainBrokenError(
                f"line {number} of {path.name} is not a JSON object: the export was edited or "
                f"cut near event {expected}",
                first_bad_seq=expected,
            )
        if "checkpoint" not in record:
            walk.add(record)
    return walk.finish()
