"""A personalized study's local training state at a node: the tensors that never leave it.

A method that keeps part of the model local (FedPer's head, FENDA's local extractor and head)
trains that part with the shared part, round after round (`Personalizer.train_round`); what it
returns beside the shared update (`RoundOutput.state`) is kept here, one row per (study, round):
the global version the round started from, the method, the tensors as safetensors bytes
(`aipipe.wire.tensors`, never a pickle), their sha256 and the time. The next round starts from
the latest state of an earlier round; a restarted node finds it in its store. The node's audit
log records each state kept (`personal.state`: round, base version, method, its sha256 and the
sha256 of the state the round started from; no values).

Why the local part costs no ε of its own. Under `privacy.mode: dp` the local part is updated
only by the DP-SGD steps that make the shared update (one clipped, noised step over every
parameter of the model; only the shared part of the result leaves): each step's gradient is
taken at parameters that are public (the global version) or post-processing of earlier noised
steps, so the shared update stays the DP release it is without personalization (Abadi et al.
2016; `aipipe.personalization.base`). A state is kept only once the round it came from was
charged to the site's ledger (`NodeWorker.charge_release`): a round whose bytes never left, and
whose steps were never accounted, leaves no state for a later round to start from. The state
itself is derived from patients' data and stays on the node, like the personal model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.audit.log import AuditLog
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.wire.tensors import Arrays, decode_arrays, encode_arrays

STATES = "personal_states"


@dataclass(frozen=True)
class PersonalState:
    study: str
    round: int
    base_version: str
    method: str
    tensors: Arrays
    sha256: str
    time: str


class PersonalStates:
    """The local training states of this node's personalized studies, by (study, round)."""

    def __init__(self, db: Database, *, at_rest: AtRest = PLAIN) -> None:
        """`at_rest`: the tensors are sealed with it in a home encrypted at rest."""
        self.db = db
        self.at_rest = at_rest
        self._table.create(
            {
                "study": str,
                "round": int,
                "base_version": str,
                "method": str,
                "tensors": bytes,
                "sha256": str,
                "time": str,
            },
            pk=("study", "round"),
            not_null={"base_version", "method", "tensors", "sha256"},
            if_not_exists=True,
        )

    @property
    def _table(self) -> Table:
        return cast(Table, self.db[STATES])

    def keep(self, study: str, number: int, base_version: str, method: str, state: Arrays) -> str:
        """Keep the state a round left (replacing one kept for the same round); its sha256."""
        blob = encode_arrays(state)
        digest = hashlib.sha256(blob).hexdigest()
        row = {
            "study": study,
            "round": number,
            "base_version": base_version,
            "method": method,
            "tensors": self.at_rest.seal(blob, f"{STATES}/{study}/{number}"),
            "sha256": digest,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._table.upsert(row, pk=("study", "round"))
        return digest

    def latest(self, study: str, method: str, *, before: int | None = None) -> PersonalState | None:
        """The newest state of `study` kept by `method` (of a round before `before`, if given)."""
        where = "study = ? AND method = ?"
        args: list[str | int] = [study, method]
        if before is not None:
            where += " AND round < ?"
            args.append(before)
        rows = list(self._table.rows_where(where, args, order_by="round DESC", limit=1))
        if not rows:
            return None
        row = rows[0]
        return PersonalState(
            study=row["study"],
            round=int(row["round"]),
            base_version=row["base_version"],
            method=row["method"],
            tensors=decode_arrays(
                self.at_rest.open(
                    row["tensors"],
                    f"{STATES}/{row['study']}/{row['round']}",
                    where=f"training state of {row['study']} round {row['round']}",
                )
            ),
            sha256=row["sha256"],
            time=row["time"],
        )


def keep_state(
    db: Database,
    audit: AuditLog,
    actor: str,
    *,
    study: str,
    number: int,
    base_version: str,
    method: str,
    state: Arrays,
    started_from: str | None,
    at_rest: AtRest = PLAIN,
) -> str:
    """Keep a round's local training state and audit it: round, base version, method, its
    sha256 and that of the state the round started from (None: the public init); no values."""
    digest = PersonalStates(db, at_rest=at_rest).keep(study, number, base_version, method, state)
    details = {"round": number, "base_version": base_version, "method": method}
    audit.append(
        "personal.state",
        actor=actor,
        resource=f"study/{study}",
        details={**details, "sha256": digest, "started_from": started_from},
    )
    return digest
