"""The hub store's studies and rounds: what was published, who takes part, and each round's
state, selected nodes and accepted updates.

`RoundTables` is the part of `HubStore` over ``studies``, ``exclusions``, ``rounds``,
``round_nodes`` and ``nonces``. The running sum of a round's accepted updates is stored with the
round and folded inside the same transaction that records the update (`fold_update`), so an
accepted update is never lost nor counted twice, and a replayed nonce is refused.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aipipe.clock import utc_now
from aipipe.errors import UpdateRejectedError
from aipipe.secure.at_rest import AtRest
from aipipe.store.node_store import later
from aipipe.store.sqlite import Tables
from aipipe.wire import RoundState

# States of a round not yet ended (it may still take updates or be aggregating), in SQL.
_PENDING = tuple(state for state in RoundState if not state.ended)
_IN_PENDING = f"state IN ({', '.join('?' * len(_PENDING))})"


@dataclass(frozen=True)
class RoundRow:
    study: str
    round: int
    state: str
    base_version: str
    deadline: str
    reason: str | None
    result_version: str | None
    sum_blob: bytes | None
    total_examples: int


class RoundTables(Tables):
    """Studies, exclusions, rounds and the updates they accepted (part of `HubStore`). In a
    home encrypted at rest a round's running sum and a study's optimizer state are sealed."""

    at_rest: AtRest

    # -- studies -----------------------------------------------------------------------------

    def add_study(self, name: str, digest: str, spec: dict[str, Any], version: str) -> None:
        self.conn.execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, NULL)",
            (name, digest, json.dumps(spec), utc_now(), version),
        )

    def study(self, name: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM studies WHERE name = ?", (name,)
        ).fetchone()
        return row

    def studies(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM studies ORDER BY name"))

    def set_study_head(self, study: str, version: str, optimizer_state: bytes | None) -> None:
        """The study's current model version and the server optimizer's state after it."""
        sealed = None if optimizer_state is None else self.at_rest.seal(
            optimizer_state, f"studies/{study}/optimizer_state"
        )  # fmt: skip
        self.conn.execute(
            "UPDATE studies SET current_version = ?, optimizer_state = ? WHERE name = ?",
            (version, sealed, study),
        )

    def study_optimizer_state(self, study: sqlite3.Row) -> bytes | None:
        """The server optimizer's state kept with a `studies` row (None if it has none)."""
        value, name = study["optimizer_state"], study["name"]
        if not value:
            return None
        label = f"studies/{name}/optimizer_state"
        return self.at_rest.open(value, label, where=f"optimizer state of study '{name}'")

    def exclude(self, study: str, node: str, reason: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO exclusions VALUES (?, ?, ?)", (study, node, reason)
        )

    def excluded(self, study: str, node: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM exclusions WHERE study = ? AND node = ?", (study, node)
        ).fetchone()
        return row is not None

    def takes_part(self, study: str, node: str) -> bool:
        """Selected for (hence offered work in) a round of the study, and not excluded since."""
        row = self.conn.execute(
            "SELECT 1 FROM round_nodes WHERE study = ? AND node = ? LIMIT 1", (study, node)
        ).fetchone()
        return row is not None and not self.excluded(study, node)

    def eligible_nodes(self, study: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM nodes WHERE state = 'active' AND name NOT IN "
            "(SELECT node FROM exclusions WHERE study = ?) ORDER BY name",
            (study,),
        )
        return [r[0] for r in rows]

    # -- rounds ------------------------------------------------------------------------------

    def _round(self, conn: sqlite3.Connection, study: str, number: int) -> RoundRow | None:
        row = conn.execute(
            "SELECT study, round, state, base_version, deadline, reason, result_version, "
            "sum_blob, total_examples FROM rounds WHERE study = ? AND round = ?",
            (study, number),
        ).fetchone()
        if row is None:
            return None
        name, rnd, state, base, deadline, reason, result, sealed, total = row
        where = f"running sum of round {number} of '{study}'"
        summed = None if sealed is None else self.at_rest.open(
            sealed, _sum_label(study, number), where=where
        )  # fmt: skip
        return RoundRow(name, rnd, state, base, deadline, reason, result, summed, total)

    def round(self, study: str, number: int) -> RoundRow | None:
        return self._round(self.conn, study, number)

    def rounds(self, study: str) -> list[RoundRow]:
        numbers = self.conn.execute(
            "SELECT round FROM rounds WHERE study = ? ORDER BY round", (study,)
        )
        return [r for (n,) in list(numbers) if (r := self.round(study, n)) is not None]

    def active_round(self, study: str) -> RoundRow | None:
        row = self.conn.execute(
            f"SELECT round FROM rounds WHERE study = ? AND {_IN_PENDING} "
            "ORDER BY round DESC LIMIT 1",
            (study, *_PENDING),
        ).fetchone()
        return None if row is None else self.round(study, int(row[0]))

    def open_round(self, study: str, base_version: str, deadline: str, selected: list[str]) -> int:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT coalesce(max(round), 0) FROM rounds WHERE study = ?", (study,)
            ).fetchone()
            number = int(row[0]) + 1
            conn.execute(
                "INSERT INTO rounds (study, round, state, base_version, deadline, opened_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (study, number, RoundState.OPEN, base_version, deadline, utc_now()),
            )
            conn.executemany(
                "INSERT INTO round_nodes (study, round, node, status) VALUES (?, ?, ?, 'selected')",
                [(study, number, node) for node in selected],
            )
        return number

    def round_nodes(self, study: str, number: int) -> list[sqlite3.Row]:
        return list(
            self.conn.execute(
                "SELECT * FROM round_nodes WHERE study = ? AND round = ? ORDER BY node",
                (study, number),
            )
        )

    def pending_rounds(self) -> list[RoundRow]:
        rows = self.conn.execute(f"SELECT study, round FROM rounds WHERE {_IN_PENDING}", _PENDING)
        return [r for s, n in list(rows) if (r := self.round(s, n)) is not None]

    def set_round_state(
        self,
        study: str,
        number: int,
        state: RoundState,
        reason: str | None = None,
        result_version: str | None = None,
    ) -> None:
        closed = utc_now() if RoundState(state).ended else None
        self.conn.execute(
            "UPDATE rounds SET state = ?, reason = coalesce(?, reason), "
            "result_version = coalesce(?, result_version), closed_at = coalesce(?, closed_at) "
            "WHERE study = ? AND round = ?",
            (state, reason, result_version, closed, study, number),
        )

    def fold_update(
        self,
        study: str,
        number: int,
        node: str,
        record: dict[str, Any],
        fold: Callable[[bytes | None], bytes | None],
    ) -> UpdateRejectedError | None:
        """Record an accepted update and fold it into the round's sum, atomically.

        `fold` maps the stored sum to the new one; under SecAgg+ nothing is stored (None): the
        masked sum is the round coordinator's, and only an unmasked sum ever reaches the store.

        Returns None on success, or why the update cannot be taken, as the error for the caller
        to raise (checked inside the transaction, so two concurrent uploads cannot both pass).
        """
        with self.transaction() as conn:
            current = self._round(conn, study, number)
            if current is None or not RoundState(current.state).active:
                return UpdateRejectedError.of(
                    f"round {number} of '{study}' is not collecting updates", "stale"
                )
            if later(utc_now(), current.deadline):
                return UpdateRejectedError.of(
                    f"round {number} of '{study}' passed its deadline {current.deadline}", "stale"
                )
            status = conn.execute(
                "SELECT status FROM round_nodes WHERE study = ? AND round = ? AND node = ?",
                (study, number, node),
            ).fetchone()
            if status is None:
                return UpdateRejectedError.of(
                    f"node '{node}' was not selected for round {number}", "stale"
                )
            if status[0] != "selected":
                return UpdateRejectedError.of(
                    f"node '{node}' already {status[0]} in round {number} (duplicate)", "duplicate"
                )
            if conn.execute(
                "SELECT 1 FROM nonces WHERE node = ? AND nonce = ?", (node, record["nonce"])
            ).fetchone():
                return UpdateRejectedError.of(
                    "this update was already received once (replayed nonce)", "duplicate"
                )
            new_sum = fold(current.sum_blob)
            if new_sum is not None:
                new_sum = self.at_rest.seal(new_sum, _sum_label(study, number))
            conn.execute(
                "UPDATE rounds SET sum_blob = ?, total_examples = total_examples + coalesce(?, 0), "
                "state = ? WHERE study = ? AND round = ?",
                (new_sum, record["num_examples"], RoundState.COLLECTING, study, number),
            )
            conn.execute(
                "UPDATE round_nodes SET status = 'reported', num_examples = ?, epsilon = ?, "
                "update_norm = ?, train_loss = ?, payload_sha256 = ?, signature = ?, at = ? "
                "WHERE study = ? AND round = ? AND node = ?",
                (
                    record["num_examples"],
                    record["epsilon"],
                    record["update_norm"],
                    record["train_loss"],
                    record["payload_sha256"],
                    record["signature"],
                    utc_now(),
                    study,
                    number,
                    node,
                ),
            )
            conn.execute("INSERT INTO nonces VALUES (?, ?)", (node, record["nonce"]))
        return None

    def node_status(self, study: str, number: int, node: str) -> str | None:
        row = self.conn.execute(
            "SELECT status FROM round_nodes WHERE study = ? AND round = ? AND node = ?",
            (study, number, node),
        ).fetchone()
        return None if row is None else str(row[0])

    def record_decline(self, study: str, number: int, node: str, reason: str) -> bool:
        """Mark a pending node as declined in an active round; False if nothing was pending."""
        cursor = self.conn.execute(
            "UPDATE round_nodes SET status = 'declined', reason = ?, at = ? "
            "WHERE study = ? AND round = ? AND node = ? AND status = 'selected' AND EXISTS "
            "(SELECT 1 FROM rounds r WHERE r.study = round_nodes.study AND "
            "r.round = round_nodes.round AND r.state IN (?, ?))",
            (reason, utc_now(), study, number, node, RoundState.OPEN, RoundState.COLLECTING),
        )
        return cursor.rowcount == 1


def _sum_label(study: str, number: int) -> str:
    return f"rounds/{study}/{number}/sum"


def stated_epsilons(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
    """(study, node, ε) for each site and study: the cumulative ε the site stated in its latest
    plaintext update header (secure studies state none). One indexed look-up
    (round_nodes_by_site) per study and enrolled node; `conn` may be a reader's own."""
    rows = conn.execute(
        "SELECT study, node, epsilon FROM (SELECT s.name AS study, n.name AS node, "
        "(SELECT epsilon FROM round_nodes WHERE study = s.name AND node = n.name AND "
        "epsilon IS NOT NULL ORDER BY round DESC LIMIT 1) AS epsilon "
        "FROM studies AS s CROSS JOIN nodes AS n) WHERE epsilon IS NOT NULL "
        "ORDER BY study, node"
    )
    return [(str(study), str(node), float(epsilon)) for study, node, epsilon in rows]
