"""Helpers the audit-log tests share: fill a log, tamper with its file as an attacker with write
access would, read its rows, the documented hash rule, and the broken-chain error `verify` must
raise."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from aipipe.audit import Action, AuditLog, verify
from aipipe.errors import AuditChainBrokenError
from aipipe.secure.identity import Identity


def _fill(path: Path, identity: Identity | None, count: int, *, every: int = 10) -> None:
    with AuditLog.open(path, identity, checkpoint_every=every, owner="st-olav") as log:
        for number in range(count):
            log.append(
                Action.TRAIN,
                actor="node:st-olav",
                resource="study:chd",
                details={"round": number, "epsilon_spent": 0.05, "update_norm": 0.9},
            )


def _tamper(path: Path, *statements: tuple[str, Sequence[Any]]) -> None:
    """Change the file as an attacker with write access would: drop the guards, then edit."""
    conn = sqlite3.connect(path)
    with conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f"DROP TRIGGER {name}")
        for sql, params in statements:
            conn.execute(sql, params)
    conn.close()


def _rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    rows = [dict(row) for row in conn.execute("SELECT * FROM events ORDER BY seq")]
    conn.close()
    return rows


def _documented_hash(row: dict[str, Any]) -> str:
    """The hash rule as an auditor reads it in the docs, written out independently."""
    content = {key: row[key] for key in row if key != "hash"}
    content["details"] = json.loads(row["details"])
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _broken(path: Path, **kwargs: Any) -> AuditChainBrokenError:
    with pytest.raises(AuditChainBrokenError) as caught:
        verify(path, **kwargs)
    return caught.value
