"""Differential privacy: DP-SGD, privacy accounting and the per-study budget ledger."""

from aipipe.privacy.accountant import (
    AccountantName,
    calibrate_noise,
    compose_epsilon,
    epsilon_for,
    sample_rate,
)
from aipipe.privacy.clipping import PerSampleClipper
from aipipe.privacy.dpsgd import DPSGD
from aipipe.privacy.errors import (
    BudgetExhaustedError,
    BudgetNotSetError,
    NoiseCalibrationError,
    PrivacyError,
    RoundAlreadyChargedError,
    UnsupportedModuleError,
)
from aipipe.privacy.ledger import BudgetLedger, BudgetStatus, LedgerEntry

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
    "PrivacyError",
    "RoundAlreadyChargedError",
    "UnsupportedModuleError",
    "calibrate_noise",
    "compose_epsilon",
    "epsilon_for",
    "sample_rate",
]
