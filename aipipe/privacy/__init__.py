"""Differential privacy: DP-SGD, privacy accounting and the site ledger (all studies, one total)."""

from aipipe.privacy.accountant import (
    AccountantName,
    calibrate_noise,
    compose_epsilon,
    epsilon_for,
    sample_rate,
)
from aipipe.privacy.clipping import PerSampleClipper
from aipipe.privacy.dpsgd import DPSGD
from aipipe.privacy.engine import Plan, PrivacyEngine
from aipipe.privacy.errors import (
    BudgetExhaustedError,
    BudgetNotSetError,
    NoiseCalibrationError,
    PrivacyError,
    RoundAlreadyChargedError,
    RoundAlreadyReleasedError,
    UnknownAccountantError,
    UnsupportedModuleError,
)
from aipipe.privacy.ledger import BudgetLedger
from aipipe.privacy.ledger_records import BudgetStatus, LedgerEntry, SiteBudget
from aipipe.privacy.protection import membership_accuracy_bound

__all__ = [
    "DPSGD",
    "AccountantName",
    "BudgetExhaustedError",
    "BudgetLedger",
    "BudgetNotSetError",
    "BudgetStatus",
    "LedgerEntry",
    "NoiseCalibrationError",
    "PerSampleClipper",
    "Plan",
    "PrivacyEngine",
    "PrivacyError",
    "RoundAlreadyChargedError",
    "RoundAlreadyReleasedError",
    "SiteBudget",
    "UnknownAccountantError",
    "UnsupportedModuleError",
    "calibrate_noise",
    "compose_epsilon",
    "epsilon_for",
    "membership_accuracy_bound",
    "sample_rate",
]
