"""The hub store's models and what is reported about them: weights, versions, metrics and
feature statistics.

`ModelTables` is the part of `HubStore` over ``models``, ``metrics`` and ``feature_stats``, and
the content-addressed blob directory: model weights rest at the sha256 of their safetensors
bytes, written 0600 through a temporary file, and checked against that digest when read. In
a hub home encrypted at rest each blob is sealed (`aipipe.secure.at_rest`) for ``blob:<sha256>``:
the name stays the digest of the plaintext, so content addressing and the digest check hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from aipipe.clock import utc_now
from aipipe.errors import BlobIntegrityError, SealedDataError
from aipipe.secure.at_rest import AtRest
from aipipe.secure.keyfiles import write_private
from aipipe.store.sqlite import Tables


class ModelTables(Tables):
    """Model blobs and versions, their metrics, and feature statistics (part of `HubStore`)."""

    blob_dir: Path
    at_rest: AtRest

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / digest[:2] / digest
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            write_private(tmp, data, what="model blob", at_rest=self.at_rest, label=_label(digest))
            os.replace(tmp, path)
        return digest

    def blob(self, digest: str) -> bytes:
        """The bytes stored at `digest`, checked against it: a damaged file is never served.

        The error names the digest, not the path: it can reach an HTTP caller.
        """
        path = self.blob_dir / digest[:2] / digest
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BlobIntegrityError(
                f"model blob {digest[:12]} is missing from the hub's blob store; restore the "
                "hub home's blobs/ from a backup"
            ) from exc
        try:
            data = self.at_rest.open(data, _label(digest), where=f"model blob {digest[:12]}")
        except SealedDataError as exc:
            raise BlobIntegrityError(str(exc)) from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobIntegrityError(
                f"model blob {digest[:12]} is damaged (its sha256 does not match); restore the "
                "hub home's blobs/ from a backup"
            )
        return data

    def add_model(
        self,
        version: str,
        study: str,
        number: int,
        parent: str | None,
        aggregator: str,
        blob: str,
        lineage: dict[str, Any],
    ) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (version, study, number, parent, utc_now(), aggregator, blob, json.dumps(lineage)),
        )

    def model(self, version: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM models WHERE version = ?", (version,)
        ).fetchone()
        return row

    def models(self, study: str | None = None) -> list[sqlite3.Row]:
        if study is None:
            return list(self.conn.execute("SELECT * FROM models ORDER BY created_at"))
        return list(
            self.conn.execute("SELECT * FROM models WHERE study = ? ORDER BY round", (study,))
        )

    def add_metrics(self, version: str, node: str, report: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
            (version, node, json.dumps(report), utc_now()),
        )

    def metrics(self, version: str) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT node, report FROM metrics WHERE version = ? ORDER BY node", (version,)
        )
        return {node: json.loads(report) for node, report in rows}

    def metrics_mark(self) -> tuple[int, str | None]:
        """(reports kept, the latest one's time): changes whenever a report arrives or is
        replaced, so a reader can tell cheaply whether anything derived from reports is stale."""
        count, latest = self.conn.execute("SELECT COUNT(*), MAX(at) FROM metrics").fetchone()
        return int(count), latest

    def put_feature_stats(self, study: str, node: str, digest: str, stats: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO feature_stats VALUES (?, ?, ?, ?)",
            (study, node, digest, json.dumps(stats)),
        )

    def feature_stats(self, study: str, digest: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT stats FROM feature_stats WHERE study = ? AND digest = ? ORDER BY node",
            (study, digest),
        )
        return [json.loads(row[0]) for row in rows]

    def has_metrics(self, version: str, node: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM metrics WHERE version = ? AND node = ?", (version, node)
        ).fetchone()
        return row is not None


def _label(digest: str) -> str:
    """What a sealed blob is sealed for: a blob put at another digest's place does not open."""
    return f"blob:{digest}"
