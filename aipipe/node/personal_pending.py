"""Personal models made when the node is idle, not between a round's acknowledgement and the
node's next poll (`aipipe.node.personal` makes them; the daemon decides when).

Evaluating a round's result (`aipipe.node.evaluating`) records here, in the table
`personal_pending` of the node store, the version to personalize: study, study digest, round,
version and the version's weights as downloaded and lineage-verified (a global model: what the
hub serves every node, not PHI). One row per study: only the newest version matters, since the
next personal model starts from the newest one's carry and the site serves the lowest
validation loss among what it made. A newer version supersedes an older pending one, which is
then never made; the row lists it (the newest `MAX_LISTED` of them, and how many) and when the
newest is made, or refused, one `personal.skipped` event names the versions skipped and the one
that superseded them (so the audit log says why a version has no personal model). Recording a
version therefore appends no audit event: during back-to-back rounds every evaluation supersedes
the pending version, and an fsync'd audit append per round and node was most of what a
personalized round cost beyond a plain one (docs/BENCHMARKS.md). An older version evaluated late
is skipped at once, audited the same way. The row survives a restart.

The daemon makes the pending ones (`make_pending`) when the hub has no work for the node, and
in `node start --once` before it stops. The weights are checked again against the round's
pinned result (`aipipe.node.lineage`) before they are used. A personalization that fails is
audited `personal.model` refused, as before, and is not tried again; one interrupted (SIGTERM)
stays pending: nothing of it was kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlite_utils.db import Table

from aipipe.errors import AipipeError, HubUnavailableError
from aipipe.models.errors import UnverifiedModelError
from aipipe.node.lineage import ModelLineage, version_address
from aipipe.node.personal import ACTION, make_personal
from aipipe.node.site import SiteNode
from aipipe.store.node_store import NodeStore
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import decode_arrays

TABLE = "personal_pending"
SKIPPED = "personal.skipped"
MAX_LISTED = 16  # superseded versions a row (and its `personal.skipped` event) names, the newest

Guard = Callable[[], AbstractContextManager[None]]


class PendingSite(SiteNode, Protocol):
    """The node as the idle personalization sees it (`NodeWorker` is one)."""

    def approved_spec(self, study: str, digest: str | None) -> StudySpec: ...


@dataclass(frozen=True)
class Skipped:
    """The versions a pending one superseded since the last personal model was made: the
    newest `MAX_LISTED` as (round, version), and how many in all."""

    listed: tuple[tuple[int, str], ...] = ()
    count: int = 0

    def plus(self, more: Skipped, number: int, version: str) -> Skipped:
        """These, then `more` and (`number`, `version`): what a newer version inherits."""
        listed = (*self.listed, *more.listed, (number, version))[-MAX_LISTED:]
        return Skipped(listed, self.count + more.count + 1)

    def to_json(self) -> str | None:
        return json.dumps({"listed": self.listed, "count": self.count}) if self.count else None

    @classmethod
    def from_json(cls, text: str | None) -> Skipped:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(tuple((int(n), str(v)) for n, v in raw["listed"]), int(raw["count"]))


@dataclass(frozen=True)
class Pending:
    study: str
    study_digest: str | None
    round: int
    version: str
    weights: bytes  # the version's safetensors bytes, as downloaded and verified
    skipped: Skipped = field(default_factory=Skipped)  # superseded by it, not audited yet


class PendingPersonal:
    """The versions waiting to be personalized, one per study (the table `personal_pending`);
    their weights sealed in a home encrypted at rest, like every model the node keeps."""

    def __init__(self, store: NodeStore) -> None:
        self.db, self.at_rest = store.db, store.at_rest
        self._table.create(
            {"study": str, "study_digest": str, "round": int, "version": str,
             "weights": bytes, "created": str},
            pk="study",
            if_not_exists=True,
        )  # fmt: skip
        if "superseded" not in self._table.columns_dict:  # a table made before the column
            self._table.add_column("superseded", str)

    def all(self) -> list[Pending]:
        return [self._pending(r) for r in self._table.rows_where(order_by="study")]

    def get(self, study: str) -> Pending | None:
        rows = [self._pending(r) for r in self._table.rows_where("study = ?", [study])]
        return rows[0] if rows else None

    def head(self, study: str) -> tuple[int, str, Skipped] | None:
        """The pending version's round, version and what it superseded; its weights are not
        read (recording a newer version needs no more)."""
        row = self.db.conn.execute(
            f"SELECT round, version, superseded FROM {TABLE} WHERE study = ?", (study,)
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]), Skipped.from_json(row[2]))

    def any(self) -> bool:
        """Whether anything is pending (asked before every poll: no weights are read)."""
        return self.db.conn.execute(f"SELECT 1 FROM {TABLE} LIMIT 1").fetchone() is not None

    def _pending(self, r: dict[str, Any]) -> Pending:
        return Pending(str(r["study"]), r["study_digest"], int(r["round"]), str(r["version"]),
                       self._open(str(r["study"]), bytes(r["weights"])),
                       Skipped.from_json(r.get("superseded")))  # fmt: skip

    def put(self, pending: Pending) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        weights = self.at_rest.seal(pending.weights, _label(pending.study))
        row: dict[str, Any] = {**pending.__dict__, "weights": weights, "created": now,
                               "superseded": pending.skipped.to_json()}  # fmt: skip
        del row["skipped"]
        self._table.upsert(row, pk="study")

    def _open(self, study: str, sealed: bytes) -> bytes:
        where = f"the weights pending personalization for study '{study}'"
        return self.at_rest.open(sealed, _label(study), where=where)

    def drop(self, study: str, version: str) -> None:
        self.db.conn.execute(
            f"DELETE FROM {TABLE} WHERE study = ? AND version = ?", (study, version)
        )
        self.db.conn.commit()

    @property
    def _table(self) -> Table:
        return cast(Table, self.db[TABLE])


def record_pending(node: SiteNode, spec: StudySpec, pending: Pending) -> str:
    """Keep `pending` for the next idle moment, superseding an older pending version of the
    study (listed in the row, audited when the newest is made; no audit event here: this runs
    once a round); a line for the work item's summary."""
    table = PendingPersonal(node.store)
    before = table.head(spec.name)
    if before is not None:
        number, version, skipped = before
        if version == pending.version:
            pending = replace(pending, skipped=skipped)
        elif pending.round < number:  # an older version evaluated late: never made
            _audit_skipped(node, spec.name, Skipped(((pending.round, pending.version),), 1),
                           superseded_by=version)  # fmt: skip
            return "; personal model skipped (a newer version is pending)"
        else:
            pending = replace(pending, skipped=skipped.plus(pending.skipped, number, version))
    table.put(pending)
    return "; personal model pending (made when the node is idle)"


def _audit_skipped(node: SiteNode, study: str, skipped: Skipped, *, superseded_by: str) -> None:
    """One event for the versions never personalized because `superseded_by` came after them."""
    if not skipped.count:
        return
    listed: Sequence[dict[str, Any]] = [{"round": n, "version": v} for n, v in skipped.listed]
    node.audit.append(
        SKIPPED,
        actor=node.name,
        resource=f"study/{study}",
        details={"study": study, "skipped": listed, "count": skipped.count,
                 "superseded_by": superseded_by},
    )  # fmt: skip


def has_pending(node: SiteNode) -> bool:
    return PendingPersonal(node.store).any()


def make_pending(node: PendingSite, guard: Guard = nullcontext) -> list[str]:
    """Make every pending personal model (the newest per study), one line each. `guard` wraps
    the training: the daemon's lets SIGTERM abort it there, leaving the version pending."""
    table = PendingPersonal(node.store)
    return [_make(node, table, pending, guard) for pending in table.all()]


def _make(node: PendingSite, table: PendingPersonal, pending: Pending, guard: Guard) -> str:
    study, version = pending.study, pending.version
    try:
        spec = node.approved_spec(study, pending.study_digest)
        _verify(node, pending)
        mine = make_personal(node.store, node.audit, node.name, spec, pending.round, version,
                             decode_arrays(pending.weights), node.features(spec),
                             guard=guard)  # fmt: skip
    except HubUnavailableError as exc:  # a first extraction reports its statistics: try again
        return f"personal model of {study} from {version[:12]} still pending: {exc}"
    except (AipipeError, ValueError, RuntimeError) as exc:
        node.audit.append(
            ACTION,
            actor=node.name,
            resource=f"study/{study}",
            outcome="refused",
            details={"round": pending.round, "reason": str(exc)},
        )
        table.drop(study, version)
        _audit_skipped(node, study, pending.skipped, superseded_by=version)
        return f"no personal model of {study} from {version[:12]}: {exc}"
    table.drop(study, version)
    _audit_skipped(node, study, pending.skipped, superseded_by=version)
    return f"personal model {mine.sha256[:12]} of {study} from {version[:12]} (kept on this node)"


def _verify(node: SiteNode, pending: Pending) -> None:
    """The kept weights are still round `pending.round`'s pinned result, by their address."""
    lineage = ModelLineage(node.store.db)
    row = lineage.require_round(pending.study, pending.round, pending.version)
    base, pinned = str(row["base_version"]), row["result_version"]
    address = version_address(pending.study, pending.round, base, pending.weights)
    if pinned != pending.version or address != pending.version:
        raise UnverifiedModelError(
            f"the weights kept to personalize version {pending.version[:12]} of study "
            f"'{pending.study}' are not round {pending.round}'s verified result; not used"
        )


def _label(study: str) -> str:
    return f"{TABLE}/{study}/weights"
