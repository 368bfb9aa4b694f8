"""Disjoint cohorts: which studies of a site the ledger may account apart, checked by the node.

Parallel composition (McSherry 2009, "Privacy Integrated Queries", Thm. 2): mechanisms run on
DISJOINT subsets of the patients do not compose; a patient is in at most one of them, so the
whole costs the largest of their ε, not their composition. A study may declare
`privacy.cohort: disjoint`: its patients share no one with the site's other studies. The node
does not take the word for it. At every release it records the release's cohort (keyed hashes
of the pseudonymous patient ids, never raw ids: `NodeStore.cohort_hashes`) in
`privacy_cohorts`, and a claim holds only while the study's recorded cohort meets no other
study's. The site's ε is then the largest, over groups, of each group's composed ε: one shared
group of every study not verified disjoint, and one group per verified-disjoint study.

The claim is checked at the study's first release; a study that released without the claim
(or before cohorts were recorded) stays shared. It is checked again at each later release of
any study, since cohorts grow with new ingests: the first overlap (or a release whose cohort is
unknown) moves the study to the shared group for good, with all its past releases, so the
site's ε only ever rises. A refused claim is noted (`reason`) and the node audits it.

Caveat: this holds with the patient as the unit (one patient = one row, which the split and
feature extraction guarantee) and for add/remove neighbours, since a study's cohort is a
function of each patient's own record. It does not hold if two "patients" are one person under
two ids: link records before ingest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.privacy.ledger_schema import COHORTS, GROUPS, LEDGER

SHARED = "shared"
DISJOINT = "disjoint"


@dataclass(frozen=True)
class Cohort:
    """The patients a release is computed on, as keyed hashes, and what the study claims."""

    patients: frozenset[str]
    disjoint: bool = False


@dataclass(frozen=True)
class StudyGroup:
    study: str
    claim: str  # what the study declares: "shared" | "disjoint"
    group: str  # how it is accounted: "shared" | "disjoint" (verified)
    since: str  # when it was verified disjoint, or moved to (or started in) the shared group
    reason: str
    known: bool = True  # every release of the study had its cohort recorded


class CohortBook:
    """The recorded cohorts and each study's group (tables in the ledger's database)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def groups(self) -> dict[str, StudyGroup]:
        """Every study with releases: its claim and group. Studies released before cohorts were
        recorded are shared, their cohort unknown."""
        found = {str(r["study"]): _group(r) for r in self._groups.rows}
        for (study,) in self.db.conn.execute(f"SELECT DISTINCT study FROM [{LEDGER}]"):
            if study not in found:
                reason = "released before cohorts were recorded"
                found[study] = StudyGroup(study, SHARED, SHARED, "", reason, known=False)
        return found

    def plan(self, study: str, cohort: Cohort | None) -> dict[str, StudyGroup]:
        """The groups once `study` releases over `cohort` (None: not recorded). Writes nothing."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        current = self.groups()
        mine = self.patients(study) | (cohort.patients if cohort is not None else frozenset())
        others = {s: g for s, g in current.items() if s != study}
        plan = dict(current)
        plan[study] = _own(study, current.get(study), cohort, mine, others, self, now)
        for other, group in others.items():
            if group.group != DISJOINT:
                continue
            if cohort is None:
                why = f"study '{study}' released without a recorded cohort"
                plan[other] = _moved(group, why, now)
            elif shared := len(mine & self.patients(other)):
                why = f"{shared} of its patients also in study '{study}'"
                plan[other] = _moved(group, why, now)
        return plan

    def record(self, study: str, cohort: Cohort | None, plan: dict[str, StudyGroup]) -> None:
        """Write the release's cohort and the planned groups (inside the charge's transaction)."""
        if cohort is not None:
            self._cohorts.insert_all(
                ({"study": study, "patient_hash": h} for h in sorted(cohort.patients)),
                ignore=True,
            )
        current = {str(r["study"]): _group(r) for r in self._groups.rows}
        for name, group in plan.items():
            if current.get(name) != group and (name == study or name in current):
                self._groups.upsert(
                    {
                        "study": name,
                        "claim": group.claim,
                        "grp": group.group,
                        "since": group.since,
                        "reason": group.reason,
                        "known": int(group.known),
                    },
                    pk="study",
                )

    def patients(self, study: str) -> frozenset[str]:
        rows = self.db.conn.execute(
            f"SELECT patient_hash FROM [{COHORTS}] WHERE study = ?", [study]
        )
        return frozenset(str(r[0]) for r in rows)

    @property
    def _groups(self) -> Table:
        return cast(Table, self.db[GROUPS])

    @property
    def _cohorts(self) -> Table:
        return cast(Table, self.db[COHORTS])


def accounting_groups(
    groups: dict[str, StudyGroup], studies: Iterable[str]
) -> dict[str, list[str]]:
    """The accounting groups: "shared" → its studies, and one group per disjoint study."""
    out: dict[str, list[str]] = {SHARED: []}
    for study in studies:
        group = groups.get(study)
        if group is not None and group.group == DISJOINT:
            out[f"{DISJOINT}:{study}"] = [study]
        else:
            out[SHARED].append(study)
    return out


def group_of(groups: dict[str, StudyGroup], study: str) -> str:
    """The key `accounting_groups` gives the study's group."""
    group = groups.get(study)
    return f"{DISJOINT}:{study}" if group is not None and group.group == DISJOINT else SHARED


def refusal_note(group: StudyGroup) -> str:
    """What the refusal says about the study's cohort claim (nothing when it makes none)."""
    if group.group == DISJOINT:
        return ", its verified disjoint cohort accounted apart"
    if group.claim == DISJOINT:
        return f"; its {group.reason}, so it is accounted with the shared site total"
    return ""


def _own(
    study: str,
    current: StudyGroup | None,
    cohort: Cohort | None,
    mine: frozenset[str],
    others: dict[str, StudyGroup],
    book: CohortBook,
    now: str,
) -> StudyGroup:
    claim = DISJOINT if cohort is not None and cohort.disjoint else SHARED
    if current is None:  # the study's first release: verify its claim, if it makes one
        if cohort is None:
            return StudyGroup(
                study, SHARED, SHARED, now, "released without a recorded cohort", False
            )
        if not cohort.disjoint:
            return StudyGroup(study, SHARED, SHARED, now, "declared shared")
        return _verified(study, mine, others, book, now)
    if current.group != DISJOINT:  # shared once, shared for good (ε never goes down)
        known = current.known and cohort is not None
        return replace(current, claim=claim if cohort is not None else current.claim, known=known)
    if cohort is None:
        return _moved(current, "released without a recorded cohort", now)
    if not cohort.disjoint:
        return _moved(replace(current, claim=SHARED), "no longer declared disjoint", now)
    checked = _verified(study, mine, others, book, now)
    return current if checked.group == DISJOINT else _moved(current, checked.reason, now)


def _verified(
    study: str,
    mine: frozenset[str],
    others: dict[str, StudyGroup],
    book: CohortBook,
    now: str,
) -> StudyGroup:
    unknown = sorted(s for s, g in others.items() if not g.known)
    if unknown:
        why = f"the cohort of study '{unknown[0]}' was never recorded, so no overlap check"
        return StudyGroup(study, DISJOINT, SHARED, now, f"disjoint claim refused: {why}")
    for other in sorted(others):
        if shared := len(mine & book.patients(other)):
            why = f"{shared} of its patients also in study '{other}'"
            return StudyGroup(study, DISJOINT, SHARED, now, f"disjoint claim refused: {why}")
    return StudyGroup(study, DISJOINT, DISJOINT, now, "verified disjoint from every other study")


def _moved(group: StudyGroup, why: str, now: str) -> StudyGroup:
    reason = why if why.startswith("disjoint claim refused") else f"disjoint claim refused: {why}"
    return replace(group, group=SHARED, since=now, reason=reason)


def _group(row: dict[str, object]) -> StudyGroup:
    return StudyGroup(
        study=str(row["study"]),
        claim=str(row["claim"]),
        group=str(row["grp"]),
        since=str(row["since"]),
        reason=str(row["reason"]),
        known=bool(row["known"]),
    )
