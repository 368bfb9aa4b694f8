"""Which model versions a node evaluates, and where its evaluations stay.

A node's test split answers whatever model it is given: a crafted version (w = 0, b = 1)
scored on it gives the exact count of positive labels, and with side knowledge one patient's
label from the loss. So a node evaluates only a version it can tie to a round it took part in:

- it remembers, in its own store, every round it was offered and charged (study, round, base);
- the version must be the one the hub names as that round's result, whose content address
  (`aipipe.hub.models.version_id`: sha256 over study, round, parent and the sha256 of the
  weights) recomputes from the weights downloaded, that round and the base the node trained;
- the first result seen for a round is pinned: another version for the same round is refused.

The hub does not sign model versions, so this does not prove the hub aggregated honestly (an
unsigned plaintext aggregate cannot be re-checked by one node); it does refuse any version
published outside a round this node took part in, and any second result for one.

Evaluations stay on the node (`local_evaluations`, with the exact validation report: AUC,
calibration); what may leave is the study's DP validation histogram, charged to the site ledger
first (`aipipe.node.validation`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.models.errors import UnverifiedModelError

ROUNDS = "lineage_rounds"
EVALUATIONS = "local_evaluations"


def version_address(study: str, number: int, parent: str, weights: bytes) -> str:
    """The address the hub gives a round's result (`aipipe.hub.models.version_id`)."""
    digest = hashlib.sha256(weights).hexdigest()
    return hashlib.sha256(f"{study}:{number}:{parent}:{digest}".encode()).hexdigest()


@dataclass(frozen=True)
class LocalEvaluation:
    study: str
    version: str
    round: int
    n: int
    accuracy: float
    auc: float | None
    loss: float
    # The exact validation report (`ValidationReport.as_card()`): calibration bins, ECE, O/E.
    validation: dict[str, Any] | None = None


class ModelLineage:
    """Rounds this node took part in, their pinned results, and its own evaluations."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._rounds.create(
            {"study": str, "round": int, "base_version": str, "result_version": str},
            pk=("study", "round"),
            not_null={"base_version"},
            if_not_exists=True,
        )
        self._evaluations.create(
            {
                "study": str,
                "version": str,
                "round": int,
                "n": int,
                "accuracy": float,
                "auc": float,
                "loss": float,
                "time": str,
            },
            pk=("study", "version"),
            if_not_exists=True,
        )

    def record_round(self, study: str, number: int, base_version: str) -> None:
        """Remember that this node takes part in round `number`, trained from `base_version`."""
        self.db.conn.execute(
            f"INSERT OR IGNORE INTO {ROUNDS} (study, round, base_version) VALUES (?, ?, ?)",
            (study, number, base_version),
        )

    def verify(
        self, study: str, number: int, version: str, announced: str | None, weights: bytes
    ) -> None:
        """Raise `UnverifiedModelError` unless `version` is round `number`'s result as above;
        `announced` is the result the hub's round record names. Pins the first result seen."""
        row = self.require_round(study, number, version)
        base, pinned = str(row["base_version"]), row["result_version"]
        assert pinned is None or isinstance(pinned, str)
        if pinned is not None and pinned != version:
            raise UnverifiedModelError(
                f"round {number} of study '{study}' already produced version {pinned[:12]}; the "
                f"hub now offers {version[:12]} for it, which this node does not evaluate"
            )
        if announced != version:
            raise UnverifiedModelError(
                f"the hub names {str(announced)[:12]} as the result of round {number} of study "
                f"'{study}', not the version {version[:12]} it asks this node to evaluate"
            )
        if version_address(study, number, base, weights) != version:
            raise UnverifiedModelError(
                f"the weights served as version {version[:12]} do not hash to it with round "
                f"{number} and parent {base[:12]} (the base this node trained from)"
            )
        self.db.conn.execute(
            f"UPDATE {ROUNDS} SET result_version = ? WHERE study = ? AND round = ?",
            (version, study, number),
        )

    def require_round(self, study: str, number: int, version: str) -> dict[str, object]:
        """This node's record of round `number`; `UnverifiedModelError` if it took no part."""
        row = self._round(study, number)
        if row is None:
            raise UnverifiedModelError(
                f"version {version[:12]} claims round {number} of study '{study}', in which this "
                "node took no part; it evaluates only results of its own rounds"
            )
        return row

    def pinned_round(self, study: str, version: str) -> int | None:
        """The round of this node's whose verified (pinned) result `version` is; None when it
        pinned no round's result to it (the hub's word is then all there is to place it)."""
        found = self.db.conn.execute(
            f"SELECT round FROM {ROUNDS} WHERE study = ? AND result_version = ?", (study, version)
        ).fetchone()
        return None if found is None else int(found[0])

    def save(self, evaluation: LocalEvaluation) -> None:
        row: dict[str, object] = {
            **evaluation.__dict__,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        row["validation"] = (
            None if evaluation.validation is None else json.dumps(evaluation.validation)
        )
        self._evaluations.upsert(row, pk=("study", "version"), alter=True)

    def evaluation(self, study: str, version: str) -> LocalEvaluation | None:
        """This node's own evaluation of `version`, if it made one."""
        rows = list(self._evaluations.rows_where("study = ? AND version = ?", [study, version]))
        if not rows:
            return None
        row = rows[0]
        auc = row["auc"]
        return LocalEvaluation(
            study=str(row["study"]),
            version=str(row["version"]),
            round=int(row["round"]),
            n=int(row["n"]),
            accuracy=float(row["accuracy"]),
            auc=None if auc is None else float(auc),
            loss=float(row["loss"]),
            validation=json.loads(row["validation"]) if row.get("validation") else None,
        )

    def _round(self, study: str, number: int) -> dict[str, object] | None:
        rows = list(self._rounds.rows_where("study = ? AND round = ?", [study, number]))
        return rows[0] if rows else None

    @property
    def _rounds(self) -> Table:
        return cast(Table, self.db[ROUNDS])

    @property
    def _evaluations(self) -> Table:
        return cast(Table, self.db[EVALUATIONS])
