"""The consortium at a glance (`GET /v1/dashboard`, drawn by the page at `GET /dashboard`).

`build` reads what the hub already holds — nodes, studies and their rounds, the ε each site
stated, what sites reported for each version, the model registry — and `audit_status` verifies
the hub's own audit chain against the hub's key. Nothing here is new information: an overseer
could read each part through the other routes; ε is shown only where the site stated it in a
plaintext update header (secure studies disclose none), never estimated.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aipipe.audit import Checkpoint, verify
from aipipe.audit.storage import read_snapshot
from aipipe.clock import utc_now
from aipipe.errors import AuditChainBrokenError
from aipipe.hub.validation import validation_card
from aipipe.store.hub_rounds import stated_epsilons
from aipipe.store.hub_store import HubStore
from aipipe.study.spec import StudySpec
from aipipe.wire import SecureMode
from aipipe.wire.dashboard import (
    AuditStatus,
    Dashboard,
    DashboardNode,
    DashboardRound,
    DashboardStudy,
    DashboardVersion,
    SiteRound,
)

_REPORTED = ("accuracy", "auc", "local_accuracy", "local_auc")


def build(
    hub: str, store: HubStore, spec: Callable[[str], StudySpec], audit: AuditStatus
) -> Dashboard:
    """The dashboard of the hub named `hub`; `spec` gives a published study by name."""
    rows = store.studies()
    heads = {str(r["name"]): r["current_version"] for r in rows}
    return Dashboard(
        hub=hub,
        generated_at=utc_now(),
        nodes=nodes(store),
        studies=[study(store, row, spec(str(row["name"]))) for row in rows],
        versions=versions(store, heads),
        audit=audit,
    )


def nodes(store: HubStore) -> list[DashboardNode]:
    screened = store.reputations()  # only nodes a study's detection screened
    return [
        DashboardNode(
            name=str(r["name"]),
            state=str(r["state"]),
            enrolled_at=str(r["enrolled_at"]),
            last_seen=r["last_seen"],
            reputation=screened.get(str(r["name"]), {}).get("reputation"),
        )
        for r in store.nodes()
    ]


def study(store: HubStore, row: sqlite3.Row, spec: StudySpec) -> DashboardStudy:
    disclosed = SecureMode(spec.secure) is SecureMode.NONE
    dp = spec.privacy.mode == "dp"
    rounds = [_round(store, spec, r, disclosed) for r in _round_rows(store.conn, spec.name)]
    return DashboardStudy(
        name=spec.name,
        digest=str(row["digest"]),
        published_at=str(row["published_at"]),
        secure=str(spec.secure),
        privacy=spec.privacy.mode,
        epsilon_target=spec.privacy.epsilon if dp else None,
        epsilon_disclosed=disclosed,
        epsilon_by_site=_latest_epsilon(store.conn, spec.name) if disclosed else {},
        current_version=row["current_version"],
        rounds=rounds,
    )


def _round_rows(conn: sqlite3.Connection, study: str) -> list[sqlite3.Row]:
    return list(
        conn.execute(
            "SELECT round, state, deadline, opened_at, closed_at, reason, result_version "
            "FROM rounds WHERE study = ? ORDER BY round",
            (study,),
        )
    )


def _round(store: HubStore, spec: StudySpec, row: sqlite3.Row, disclosed: bool) -> DashboardRound:
    number, version = int(row["round"]), row["result_version"]
    reports = store.metrics(version) if version else {}
    members = store.round_nodes(spec.name, number)
    sites = [
        SiteRound(
            node=str(m["node"]),
            status=str(m["status"]),
            epsilon=m["epsilon"] if disclosed else None,
            **_reported(reports.get(str(m["node"]), {})),
        )
        for m in members
    ]
    return DashboardRound(
        round=number,
        state=str(row["state"]),
        opened_at=str(row["opened_at"]),
        closed_at=row["closed_at"],
        deadline=str(row["deadline"]),
        reason=row["reason"],
        participants=[s.node for s in sites if s.status == "reported"],
        selected=len(sites),
        declined={
            str(m["node"]): str(m["reason"] or "") for m in members if m["status"] == "declined"
        },
        result_version=version,
        pooled_auc=_pooled_auc(store, version),
        sites=sites,
    )


def _reported(report: dict[str, Any]) -> dict[str, float]:
    """The numbers a site reported for a version, where it reported any."""
    out = {}
    for key in _REPORTED:
        value = report.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _pooled_auc(store: HubStore, version: str | None) -> float | None:
    card = validation_card(store, version) if version else None
    if not card or not card.get("sites"):
        return None
    auc = card.get("auc")
    return float(auc) if isinstance(auc, int | float) else None


def _latest_epsilon(conn: sqlite3.Connection, study: str) -> dict[str, float]:
    """Each site's cumulative ε as stated in its latest plaintext update of `study`."""
    return {node: epsilon for name, node, epsilon in stated_epsilons(conn) if name == study}


def versions(store: HubStore, heads: dict[str, str | None]) -> list[DashboardVersion]:
    out = []
    for row in store.models():
        lineage = json.loads(row["lineage"])
        out.append(
            DashboardVersion(
                version=str(row["version"]),
                study=str(row["study"]),
                round=int(row["round"]),
                parent=row["parent"],
                created_at=str(row["created_at"]),
                aggregator=str(row["aggregator"]),
                contributors=len(lineage.get("contributors", [])),
                sha256=str(row["blob"]),
                current=heads.get(str(row["study"])) == row["version"],
            )
        )
    return out


def audit_status(path: Path, owner_key: bytes) -> AuditStatus:
    """Verify the hub's audit log at `path` against its owner's key (the whole chain: run it
    off the event loop), with the last checkpoint the walk verified."""
    try:
        report = verify(path, trusted_keys=[owner_key])
    except AuditChainBrokenError as exc:
        last = _last_checkpoint(path, before=exc.first_bad_seq)
        return AuditStatus(
            verified=False,
            events=max(0, exc.first_bad_seq - 1),
            broken_at=exc.first_bad_seq,
            problem=str(exc),
            last_checkpoint_seq=None if last is None else last.seq,
            last_checkpoint_time=None if last is None else last.time,
        )
    last = _last_checkpoint(path, before=report.events + 1)
    return AuditStatus(
        verified=True,
        events=report.events,
        checkpoints=report.checkpoints,
        last_checkpoint_seq=None if last is None else last.seq,
        last_checkpoint_time=None if last is None else last.time,
        unanchored=report.unanchored,
    )


def _last_checkpoint(path: Path, before: int) -> Checkpoint | None:
    """The newest checkpoint at an event before `before` (those the walk verified)."""
    with read_snapshot(path) as snapshot:
        signed = [c for c in snapshot.checkpoints if isinstance(c.seq, int) and c.seq < before]
    return max(signed, key=lambda c: c.seq, default=None)
