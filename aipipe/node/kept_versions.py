"""The weights of the model versions a node has evaluated, kept so that its validation gate
can fall back to one of them without asking the hub for anything.

Why: a node that fetched an earlier version's weights (or round) right after the current
one's would tell the hub that the current version misses the study's minimum on this site's
held-out patients, a bit computed from patient data that is neither noised nor charged. So
when the node evaluates a version (its `evaluate` work item, or the gate evaluating the
current version), it keeps the weights it downloaded and verified, next to the exact report
it keeps in `local_evaluations`; the gate's fallback reads only these (`aipipe.node.validation`),
and the hub sees the same requests whether the current version passes here or not.

The table `kept_versions` of the node store holds, per study, the last `KEPT_PER_STUDY` versions
by round (an older one is deleted when a newer one is kept): study, version, round, the sha256
of the weights (their content address) and the weights, sealed in a home encrypted at rest
like every model the node keeps (`SEALED_COLUMNS`, for `kept_versions/<study>/<version>`).
A read checks the weights again: they must hash to the kept sha256, and with the round and
the base this node trained that round from to the version itself, the round's pinned result
(`aipipe.node.lineage`); weights that do not are never returned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

from sqlite_utils.db import Table

from aipipe.clock import utc_now
from aipipe.errors import AipipeError
from aipipe.models.errors import UnverifiedModelError
from aipipe.node.lineage import ModelLineage, version_address
from aipipe.store.node_store import NodeStore

TABLE = "kept_versions"
# The gate tries the current version and at most this many less one earlier versions of its
# lineage, so a node keeps no more than this many per study.
KEPT_PER_STUDY = 5


@dataclass(frozen=True)
class KeptVersion:
    study: str
    version: str
    round: int
    weights: bytes  # the version's safetensors bytes, checked against its address on read


class KeptVersions:
    """The versions this node evaluated, with their weights (table `kept_versions`)."""

    def __init__(self, store: NodeStore) -> None:
        self.db, self.at_rest = store.db, store.at_rest
        self._table.create(
            {"study": str, "version": str, "round": int, "sha256": str, "weights": bytes,
             "kept": str},
            pk=("study", "version"),
            not_null={"sha256", "weights"},
            if_not_exists=True,
        )  # fmt: skip

    def keep(self, study: str, number: int, version: str, weights: bytes) -> None:
        """Keep `version` (round `number`'s verified result) with its weights; then only the
        newest `KEPT_PER_STUDY` of the study by round remain."""
        row: dict[str, Any] = {
            "study": study,
            "version": version,
            "round": number,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "weights": self.at_rest.seal(weights, _label(study, version)),
            "kept": utc_now(),
        }
        self._table.upsert(row, pk=("study", "version"))
        self.db.conn.execute(
            f"DELETE FROM {TABLE} WHERE study = ? AND version NOT IN (SELECT version FROM "
            f"{TABLE} WHERE study = ? ORDER BY round DESC, kept DESC LIMIT ?)",
            (study, study, KEPT_PER_STUDY),
        )
        self.db.conn.commit()

    def versions(self, study: str) -> list[str]:
        """The kept versions of `study`, newest round first."""
        rows = self._table.rows_where("study = ?", [study], order_by="round DESC")
        return [str(r["version"]) for r in rows]

    def get(self, study: str, version: str, lineage: ModelLineage) -> KeptVersion | None:
        """`version`'s kept weights, checked (None when not kept); `UnverifiedModelError` when
        they no longer hash to its kept address or are not its round's pinned result."""
        rows = list(self._table.rows_where("study = ? AND version = ?", [study, version]))
        if not rows:
            return None
        row, where = rows[0], f"the weights kept for version {version[:12]} of study '{study}'"
        try:
            weights = self.at_rest.open(bytes(row["weights"]), _label(study, version),
                                        where=where)  # fmt: skip
        except AipipeError as exc:  # altered or moved sealed bytes
            raise UnverifiedModelError(f"{where} cannot be read: {exc}") from exc
        number = int(row["round"])
        if hashlib.sha256(weights).hexdigest() != row["sha256"]:
            raise UnverifiedModelError(f"{where} do not hash to their kept address; not used")
        base = lineage.require_round(study, number, version)
        pinned = base["result_version"]
        address = version_address(study, number, str(base["base_version"]), weights)
        if pinned != version or address != version:
            raise UnverifiedModelError(
                f"{where} are not round {number}'s verified result (they do not hash to it with "
                "the base this node trained from); not used"
            )
        return KeptVersion(study, version, number, weights)

    @property
    def _table(self) -> Table:
        return cast(Table, self.db[TABLE])


def _label(study: str, version: str) -> str:
    return f"{TABLE}/{study}/{version}/weights"
