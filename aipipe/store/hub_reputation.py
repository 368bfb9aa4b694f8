"""The hub store's screening of plaintext rounds: each update's scores and each node's reputation.

`ReputationTables` is the part of `HubStore` over ``round_scores`` (per study, round and node:
the update's scores, whether it was flagged and left out) and ``reputation`` (per node, across
studies: an exponential average of its clean rounds, 1 until it is first screened). A round's
scores and the reputations they move are written in one transaction, once: a round finished
again after a hub restart finds its scores and moves no reputation twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aipipe.clock import utc_now
from aipipe.store.sqlite import Tables

SCHEMA = """
CREATE TABLE IF NOT EXISTS round_scores (
    study TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, flagged INTEGER NOT NULL,
    excluded INTEGER NOT NULL, scores TEXT NOT NULL, PRIMARY KEY (study, round, node));
CREATE TABLE IF NOT EXISTS reputation (
    node TEXT PRIMARY KEY, score REAL NOT NULL, flags INTEGER NOT NULL DEFAULT 0,
    screened INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL);
"""

INITIAL_REPUTATION = 1.0

Verdicts = dict[str, dict[str, Any]]
"""Per node: its scores, `flagged`, `excluded` and (once recorded) `reputation` after the round."""


class ReputationTables(Tables):
    """Round scores and node reputations (part of `HubStore`)."""

    def reputation(self, node: str) -> float:
        row = self.conn.execute("SELECT score FROM reputation WHERE node = ?", (node,)).fetchone()
        return INITIAL_REPUTATION if row is None else float(row[0])

    def reputations(self) -> dict[str, dict[str, Any]]:
        """Every screened node's reputation, flags and rounds screened, by name."""
        rows = self.conn.execute("SELECT node, score, flags, screened FROM reputation")
        return {
            str(r["node"]): {
                "reputation": r["score"],
                "flags": r["flags"],
                "screened": r["screened"],
            }
            for r in rows
        }

    def round_scores(self, study: str, number: int) -> Verdicts:
        rows = self.conn.execute(
            "SELECT node, scores FROM round_scores WHERE study = ? AND round = ?", (study, number)
        )
        return {str(node): json.loads(scores) for node, scores in rows}

    def record_screening(
        self,
        study: str,
        number: int,
        verdicts: Verdicts,
        step: Callable[[float, bool], float],
    ) -> tuple[Verdicts, bool]:
        """Keep the round's verdicts and move each node's reputation by `step(r, flagged)`, in
        one transaction; (the verdicts with each node's new reputation, True). A round already
        screened keeps what it has: (its stored verdicts, False)."""
        with self.transaction() as conn:
            stored = self.round_scores(study, number)
            if stored:
                return stored, False
            now = utc_now()
            out: Verdicts = {}
            for node, verdict in verdicts.items():
                flagged = bool(verdict["flagged"])
                new = step(self.reputation(node), flagged)
                out[node] = {**verdict, "reputation": round(new, 6)}
                conn.execute(
                    "INSERT INTO reputation VALUES (?, ?, ?, 1, ?) ON CONFLICT (node) DO UPDATE "
                    "SET score = excluded.score, flags = flags + excluded.flags, "
                    "screened = screened + 1, updated_at = excluded.updated_at",
                    (node, new, int(flagged), now),
                )
                conn.execute(
                    "INSERT INTO round_scores VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        study,
                        number,
                        node,
                        int(flagged),
                        int(bool(verdict["excluded"])),
                        json.dumps(out[node]),
                    ),
                )
        return out, True

    def reset_reputation(self, node: str, score: float) -> float:
        """Set a node's reputation (an admin's readmission); returns the one it had."""
        previous = self.reputation(node)
        self.conn.execute(
            "INSERT INTO reputation VALUES (?, ?, 0, 0, ?) ON CONFLICT (node) DO UPDATE "
            "SET score = excluded.score, updated_at = excluded.updated_at",
            (node, score, utc_now()),
        )
        return previous
