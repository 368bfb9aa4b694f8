"""The site ledger's records: a release as charged (`LedgerEntry`), the site's total
(`SiteBudget`), a study's standing (`BudgetStatus`), and the kinds of release charged here.

`history` turns releases into the accountant's steps (σ, q, steps), which are the source of
truth that `spent` and every budget check compose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from aipipe.privacy.accountant import AccountantName, Step
from aipipe.privacy.cohorts import StudyGroup

TRAIN = "train"
BASELINE = "baseline"


@dataclass(frozen=True)
class LedgerEntry:
    study: str
    round: int
    epsilon: float  # cumulative ε of the study after this release
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: AccountantName
    time: str
    kind: str = TRAIN
    digest: str | None = None  # sha256 of the bytes that left (None: charged before issue 10)
    site_epsilon: float | None = None  # cumulative ε of the site after this release


@dataclass(frozen=True)
class SiteBudget:
    epsilon: float
    delta: float
    explicit: bool  # False: the default, the largest study share


@dataclass(frozen=True)
class BudgetStatus:
    study: str
    epsilon_budget: float
    delta: float
    spent: float
    remaining: float
    rounds: int  # training rounds released (statistics and baselines are releases too)
    group: StudyGroup | None = None  # None: no release yet (its claim is checked at the first)


def history(entries: list[LedgerEntry]) -> list[Step]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def entry_from_row(row: dict[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        study=str(row["study"]),
        round=int(row["round"]),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        noise_multiplier=float(row["noise_multiplier"]),
        sample_rate=float(row["sample_rate"]),
        steps=int(row["steps"]),
        accountant=cast(AccountantName, row["accountant"]),
        time=str(row["time"]),
        kind=str(row["kind"]),
        digest=row["digest"],
        site_epsilon=None if row["site_epsilon"] is None else float(row["site_epsilon"]),
    )
