"""Errors of the privacy layer, each named after what went wrong.

AipipeError
└── PrivacyError                  a training round cannot be run within its privacy terms
    ├── BudgetNotSetError         the study has no site budget in the ledger
    ├── BudgetExhaustedError      the release would take the study or the site past its ε
    ├── RoundAlreadyChargedError  a resumed round asks to run with a different mechanism
    │   └── RoundAlreadyReleasedError  a round already left; other bytes for it are refused
    ├── NoiseCalibrationError     no noise multiplier reaches the target ε
    ├── UnknownAccountantError    an accountant name that is not registered (also a ValueError)
    └── UnsupportedModuleError    a model layer the exact per-sample clipper cannot handle
"""

from __future__ import annotations

from aipipe.errors import AipipeError


class PrivacyError(AipipeError):
    """A training round cannot be run within its privacy terms."""

    exit_code = 17


class BudgetNotSetError(PrivacyError):
    """A study has no privacy budget recorded for this site."""

    def __init__(self, study: str) -> None:
        super().__init__(
            f"no privacy budget is set for study '{study}'; set the site budget before training"
        )
        self.study = study


class BudgetExhaustedError(PrivacyError):
    """A release would take the study's share or the site's total ε past its budget; nothing
    was charged. `scope` says which: "study" (its share) or "site" (all studies together)."""

    def __init__(
        self,
        *,
        study: str,
        round: int,
        needed: float,
        spent: float,
        budget: float,
        scope: str = "study",
        note: str = "",
    ) -> None:
        left = max(budget - spent, 0.0)
        whose = (
            f"study '{study}'"
            if scope == "study"
            else f"the site (all studies; this is study '{study}')"
        )
        super().__init__(
            f"round {round} needs ε={needed:.2f} but {left:.2f} of {budget:.2f} is left for "
            f"{whose}{note}; lower rounds or raise the site budget"
        )
        self.scope = scope
        self.study = study
        self.round = round
        self.needed = needed
        self.spent = spent
        self.budget = budget

    @property
    def remaining(self) -> float:
        return max(self.budget - self.spent, 0.0)


class RoundAlreadyChargedError(PrivacyError):
    """A round was charged before with other (σ, q, steps); a resumed round must reuse them."""


class RoundAlreadyReleasedError(RoundAlreadyChargedError):
    """A round's update already left the node: a re-offer gets the same bytes or nothing, never
    a second draw with fresh noise (which would spend ε that no ledger records)."""


class NoiseCalibrationError(PrivacyError):
    """No noise multiplier up to the search limit keeps the planned steps within the target ε."""


class UnsupportedModuleError(PrivacyError):
    """The model holds a layer for which exact per-sample gradient norms are not implemented."""


class UnknownAccountantError(PrivacyError, ValueError):
    """A study or a call names an accountant that is not registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"no privacy accountant is registered as '{name}'; use one of {', '.join(known)}"
        )
        self.name = name
        self.known = known
