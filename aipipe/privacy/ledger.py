"""The per-study privacy budget ledger: the node's persisted, stateful accountant.

Every round's mechanism (σ, q, steps) is written BEFORE its update leaves the node, inside one
`BEGIN IMMEDIATE` transaction, so two processes cannot both spend the last of a budget. The ε a
study has spent is the composition of ALL its recorded steps under the accountant (RDP or PRV),
never the sum of per-round ε: composing T·R steps at once is far tighter than R separate bounds.
Each row keeps the cumulative ε after its round, for display and audit; `spent` recomputes it from
the recorded steps, which are the source of truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.privacy.accountant import AccountantName, Step, compose_epsilon
from aipipe.privacy.errors import BudgetExhaustedError, BudgetNotSetError, RoundAlreadyChargedError

LEDGER = "privacy_ledger"
BUDGET = "privacy_budget"


@dataclass(frozen=True)
class LedgerEntry:
    study: str
    round: int
    epsilon: float  # cumulative ε of the study after this round
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: AccountantName
    time: str


@dataclass(frozen=True)
class BudgetStatus:
    study: str
    epsilon_budget: float
    delta: float
    spent: float
    remaining: float
    rounds: int


class BudgetLedger:
    """Site budgets per study and the rounds charged against them, in a SQLite database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._budgets.create(
            {"study": str, "epsilon_budget": float, "delta": float},
            pk="study",
            not_null={"epsilon_budget", "delta"},
            if_not_exists=True,
        )
        self._ledger.create(
            {
                "study": str,
                "round": int,
                "epsilon": float,
                "delta": float,
                "noise_multiplier": float,
                "sample_rate": float,
                "steps": int,
                "accountant": str,
                "time": str,
            },
            pk=("study", "round"),
            if_not_exists=True,
        )

    def set_budget(self, study: str, *, epsilon: float, delta: float) -> None:
        """Set or replace the (ε, δ) a site grants a study; spent ε is recomputed at the new δ."""
        if epsilon <= 0 or not (0 < delta < 1):
            raise ValueError(f"a budget needs ε > 0 and 0 < δ < 1, got ε={epsilon}, δ={delta}")
        with self._write():
            self._budgets.upsert(
                {"study": study, "epsilon_budget": epsilon, "delta": delta}, pk="study"
            )

    def budget(self, study: str) -> tuple[float, float]:
        """The study's (ε budget, δ); raises `BudgetNotSetError` when there is none."""
        rows = list(self._budgets.rows_where("study = ?", [study]))
        if not rows:
            raise BudgetNotSetError(study)
        return float(rows[0]["epsilon_budget"]), float(rows[0]["delta"])

    def entries(self, study: str) -> list[LedgerEntry]:
        rows = self._ledger.rows_where("study = ?", [study], order_by="round")
        return [_entry(row) for row in rows]

    def spent(self, study: str) -> float:
        """ε of every step charged to the study, composed under its latest round's accountant."""
        entries = self.entries(study)
        if not entries:
            return 0.0
        _, delta = self.budget(study)
        latest = max(entries, key=lambda e: e.round)
        return compose_epsilon(_history(entries), delta, latest.accountant)

    def remaining(self, study: str) -> float:
        epsilon_budget, _ = self.budget(study)
        return max(epsilon_budget - self.spent(study), 0.0)

    def charge(
        self,
        study: str,
        round: int,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: AccountantName = "prv",
    ) -> LedgerEntry:
        """Record a round's mechanism and return its entry, or refuse the round.

        Raises `BudgetExhaustedError` (nothing written) when the study's cumulative ε after this
        round would exceed its budget. Charging a round again with the same mechanism returns the
        first entry: a resumed round does not pay twice.
        """
        with self._write():
            epsilon_budget, delta = self.budget(study)
            entries = self.entries(study)
            previous = next((e for e in entries if e.round == round), None)
            if previous is not None:
                return _same_round(previous, noise_multiplier, sample_rate, steps, accountant)
            history = _history(entries)
            before = compose_epsilon(history, delta, accountant)
            after = compose_epsilon(
                [*history, (noise_multiplier, sample_rate, steps)], delta, accountant
            )
            if after > epsilon_budget:
                raise BudgetExhaustedError(
                    study=study,
                    round=round,
                    needed=after - before,
                    spent=before,
                    budget=epsilon_budget,
                )
            entry = LedgerEntry(
                study=study,
                round=round,
                epsilon=after,
                delta=delta,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                time=datetime.now(UTC).isoformat(timespec="microseconds"),
            )
            self._ledger.insert(entry.__dict__)
            return entry

    def status(self) -> list[BudgetStatus]:
        """Budget, spent and remaining ε of every study with a budget, by study name."""
        result = []
        for row in self._budgets.rows_where(order_by="study"):
            study = str(row["study"])
            spent = self.spent(study)
            budget = float(row["epsilon_budget"])
            result.append(
                BudgetStatus(
                    study=study,
                    epsilon_budget=budget,
                    delta=float(row["delta"]),
                    spent=spent,
                    remaining=max(budget - spent, 0.0),
                    rounds=self._ledger.count_where("study = ?", [study]),
                )
            )
        return result

    @property
    def _budgets(self) -> Table:
        return cast(Table, self.db[BUDGET])

    @property
    def _ledger(self) -> Table:
        return cast(Table, self.db[LEDGER])

    @contextmanager
    def _write(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock before the budget is read, so the check and the
        # insert are one step even across processes. Inside a caller's transaction, join it.
        if self.db.conn.in_transaction:
            with self.db.atomic():
                yield
            return
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()


def _same_round(
    previous: LedgerEntry, sigma: float, q: float, steps: int, accountant: AccountantName
) -> LedgerEntry:
    same = (
        math.isclose(previous.noise_multiplier, sigma, rel_tol=1e-12)
        and math.isclose(previous.sample_rate, q, rel_tol=1e-12)
        and previous.steps == steps
        and previous.accountant == accountant
    )
    if not same:
        raise RoundAlreadyChargedError(
            f"round {previous.round} of study '{previous.study}' was charged with "
            f"σ={previous.noise_multiplier:g}, q={previous.sample_rate:g}, {previous.steps} steps "
            f"({previous.accountant}); a resumed round must run with the same settings"
        )
    return previous


def _history(entries: list[LedgerEntry]) -> list[Step]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def _entry(row: dict[str, Any]) -> LedgerEntry:
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
    )
